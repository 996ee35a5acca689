"""The targets of a base, asked of the family that declares it: built-in real-size tables, or any model's own.

`Target` and `Architecture` themselves live in `targets`; each family builds them from its module tables
with the names its trainers write (formats/families/).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.model.family import Family
from adapterzoo.formats.model.module_tables import ModuleTable, table_of
from adapterzoo.formats.model.registry import family_of, lora_bases
from adapterzoo.formats.model.targets import Architecture

if TYPE_CHECKING:
    import torch


def _family_with_tables(base: str) -> Family:
    family = family_of(base)
    if family is None:
        raise AdapterzooError(f"no architecture table for base {base!r} (have: {', '.join(lora_bases())})")
    if family.architecture is None:
        raise AdapterzooError(f"{family.title} files are recognised, but their LoRAs are not read yet: adapterzoo "
                              f"has no module table for {base} (LoRAs are read for {', '.join(lora_bases())})")
    return family


def builtin_architecture(base: str, variant: str | None = None) -> Architecture:
    """The real-size targets of `base` (of its `variant`, where a family's members differ in size), from the
    configs its family ships."""
    return _family_with_tables(base).architecture(base, variant)


def architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    """Targets of a concrete set of components ({"unet": ..., "text_encoder": ...}), in that order; any size."""
    family = _family_with_tables(base)
    return family.architecture_from_tables(base, tables)


def architecture_from_models(base: str, models: dict[str, torch.nn.Module]) -> Architecture:
    """Targets of models at hand (tiny test models, a loaded pipeline); any device."""
    return architecture_from_tables(base, {component: table_of(model) for component, model in models.items()})
