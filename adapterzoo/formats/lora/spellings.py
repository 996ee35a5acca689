"""The names trainers write a diffusers transformer's modules, or a single-file layout's Linears, by in LoRA keys
(FORMATS.md §1): families whose LoRAs come from the same trainers share them.
"""

from __future__ import annotations

from adapterzoo.formats.lora.lora_parts import PEFT_PREFIX
from adapterzoo.formats.model.targets import Target, flatten, relative

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
