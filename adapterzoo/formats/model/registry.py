"""The registered model families: every module or package directly under formats/families/ that holds `FAMILY`.

Families are found by listing that package, so adding one is adding its module; the dispatchers ask here
and name none. Listing imports only each family's declaration (plain Python), never torch.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Iterable

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.model.family import Family

PACKAGE = "adapterzoo.formats.families"
COMMON_LORA_TARGETS = ("kohya", "diffusers", "peft")


@functools.cache
def families() -> tuple[Family, ...]:
    """Every family, in detection order."""
    package = importlib.import_module(PACKAGE)
    found = []
    for module in pkgutil.iter_modules(package.__path__):
        family = getattr(importlib.import_module(f"{PACKAGE}.{module.name}"), "FAMILY", None)
        if isinstance(family, Family):
            found.append(family)
    owners: dict[str, str] = {}
    for family in found:
        for base in family.bases:
            if owners.setdefault(base, family.name) != family.name:
                raise AdapterzooError(f"base {base!r} is claimed by both {owners[base]} and {family.name}")
    return tuple(sorted(found, key=lambda f: (f.order, f.name)))


def family_of(base: str) -> Family | None:
    """The family answering for `base`, or None (unknown, or a base no family declares)."""
    return next((family for family in families() if base in family.bases), None)


def bases() -> tuple[str, ...]:
    """Every base word probe can answer, in detection order."""
    return tuple(base for family in families() for base in family.bases)


def lora_bases() -> tuple[str, ...]:
    """The bases whose LoRAs are read: their families ship module tables."""
    return tuple(base for family in families() if family.architecture is not None for base in family.bases)


def sampled_bases() -> tuple[str, ...]:
    """The bases verify and sample render."""
    return tuple(base for family in families() if family.sampling is not None for base in family.sampling.bases)


def lora_targets() -> tuple[str, ...]:
    """The dialects a LoRA converts to: those every family's LoRAs are written in, then any a family adds."""
    own = [to for family in families() for to in family.lora_writers if to not in COMMON_LORA_TARGETS]
    return COMMON_LORA_TARGETS + tuple(dict.fromkeys(own))


def civitai_base(label: str | None) -> str:
    """The base a Civitai baseModel label names, as the families declare it; `unknown` for any other label."""
    return next((base for family in families() for base, labels in family.civitai_base_models.items()
                 if label in labels), "unknown")


def civitai_details(label: str | None) -> dict[str, str]:
    """What a Civitai baseModel label says beyond the base (`{"family": "pony"}`, `{"variant": "medium"}`)."""
    return next((dict(family.civitai_details[label]) for family in families() if label in family.civitai_details), {})


def detail_values(detail: str) -> tuple[str, ...]:
    """Every value the families' Civitai labels give `detail` (the choices of `list --family`), sorted."""
    return tuple(sorted({said[detail] for family in families() for said in family.civitai_details.values()
                         if detail in said}))


def first(answers: Iterable[str | None]) -> str | None:
    """The first answer that is not None, the families asked in detection order."""
    return next((answer for answer in answers if answer is not None), None)
