"""Whether a LoRA fits a model: every module it names lands on one of the model's modules (a target, or a fused
Linear of the family's single-file layout) with that module's shape. Plain Python on a header, so families ask
it of their real-size tables to tell models that share names but not sizes apart.
"""

from __future__ import annotations

from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.lora_parts import module_dims
from adapterzoo.formats.model.targets import Architecture


def fits(modules: dict[str, dict[str, str]], table: TensorTable, architecture: Architecture) -> bool:
    """True if `modules` (name as spelled -> {part: key}) is not empty and every one lands on `architecture`
    with its (out, in) shape; a module whose factors tell no shape only has to land."""
    for name, parts in modules.items():
        target = architecture.resolve(name)
        fused = architecture.fused.get(name) if target is None else None
        if target is None and fused is None:
            return False
        shape = target.shape if target is not None else fused.shape
        dims = module_dims(parts, table)
        if dims is not None and dims != tuple(shape[:2]):
            return False
    return bool(modules)
