"""Small name-reading helpers the DiT families share: a key without the prefixes trainers and single files put
before a transformer's module names, and which numbered blocks a set of names touches. Plain Python."""

from __future__ import annotations

import re

# What stands before a transformer's own module names: ComfyUI single files, ComfyUI/BFL LoRAs, diffusers and
# PEFT LoRAs, kohya-style LoRAs (their names flattened with `_`).
MODULE_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.", "lora_unet_",
                   "lora_transformer_", "lycoris_")


def bare(name: str) -> str:
    """`name` without the first of MODULE_PREFIXES it starts with."""
    return next((name[len(p):] for p in MODULE_PREFIXES if name.startswith(p)), name)


def prefix_of(keys: dict | list, marker: str, prefixes: tuple[str, ...] = ("", "model.diffusion_model.")) -> str | None:
    """The prefix under which `marker` (a key of the bare layout) is among `keys`, or None."""
    return next((p for p in prefixes if p + marker in keys), None)


def block_numbers(names: list[str], blocks: str) -> list[int]:
    """The numbers of the top-level `blocks` (`double_blocks`, `layers`; dotted or flattened) that `names` touch."""
    pattern = re.compile(rf"^{blocks}[._](\d+)(?:[._]|$)")
    return sorted({int(m[1]) for name in names if (m := pattern.search(bare(name)))})
