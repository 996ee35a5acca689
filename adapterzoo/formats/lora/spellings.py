"""The names trainers write a diffusers transformer's modules, or a single-file layout's Linears, by in LoRA keys
(FORMATS.md §1): families whose LoRAs come from the same trainers share them.
"""

from __future__ import annotations

from collections.abc import Callable

from adapterzoo.formats.lora.lora_parts import PEFT_PREFIX
from adapterzoo.formats.model.layouts import Spellings
from adapterzoo.formats.model.module_tables import ModuleTable
from adapterzoo.formats.model.targets import TRANSFORMER, FusedModule, Target, flatten, relative

COMFY_PREFIX = "diffusion_model."  # ComfyUI's (and BFL's, ai-toolkit's) prefix of a transformer's LoRA keys


def transformer_spellings(target: Target) -> list[str]:
    """Every name trainers write a diffusers transformer module by: diffusers' `transformer.` path, bare, PEFT's,
    ComfyUI's `diffusion_model.`, OneTrainer's `lora_transformer_`, kohya's `lora_unet_` and LyCORIS's
    `lycoris_` flattened."""
    rel = relative(target)
    flat = flatten(rel)
    return [target.path, rel, PEFT_PREFIX + rel, COMFY_PREFIX + rel, f"lora_transformer_{flat}", f"lora_unet_{flat}",
            f"lycoris_{flat}"]


def layout_spellings(name: str) -> list[str]:
    """Every name trainers write a single-file layout's Linear by: kohya's and LyCORIS's flattened, ComfyUI's,
    bare, and PEFT's prefix (fal's trainers)."""
    return [f"lora_unet_{flatten(name)}", f"lycoris_{flatten(name)}", COMFY_PREFIX + name, name, PEFT_PREFIX + name]



def spelled_transformer(table: ModuleTable, layout: Callable[[dict[str, Target]], list[FusedModule]]
                        ) -> tuple[dict[str, Target], Spellings, tuple[FusedModule, ...]]:
    """A transformer's targets from its module table, its single-file layout's Linears, and every name each of
    them is written by (`transformer_spellings`, `layout_spellings`)."""
    targets: dict[str, Target] = {}
    spellings = Spellings()
    for module_path, shape in table.modules:
        target = Target(f"{TRANSFORMER}.{module_path}", TRANSFORMER, module_path, None, shape)
        targets[target.path] = target
        for name in transformer_spellings(target):
            spellings.alias(name, target.path)
    linears = tuple(layout(targets))
    for module in linears:
        spellings.layout(module, layout_spellings(module.name))
    return targets, spellings, linears
