"""ComfyUI's own LoRA spelling of a DiT family: the model's single-file module names under `diffusion_model.`
(what ComfyUI's `model_lora_keys_unet` maps and diffusers' converters strip), with lora_A/B or lora_down/up parts.
Several families share the dialect's name; each recognises its own module names."""

from __future__ import annotations

import re

from adapterzoo.formats.lora.lora_parts import KOHYA_SUFFIXES, PEFT_SUFFIXES, split_suffix
from adapterzoo.formats.model.family import Dialect

COMFY_PREFIX = "diffusion_model."
LORA_ENDINGS = PEFT_SUFFIXES + (".lora_down.weight", ".lora_up.weight", ".lokr_w1", ".lokr_w1_a", ".hada_w1_a",
                                ".diff")


def comfy_dialect(own: re.Pattern[str]) -> Dialect:
    """The `comfy` dialect of a family whose module names (without the prefix) `own` finds."""
    def speaks(keys: list[str]) -> bool:
        return any(k.startswith(COMFY_PREFIX) and k.endswith(LORA_ENDINGS) and own.search(k[len(COMFY_PREFIX):])
                   for k in keys)

    return Dialect("comfy", speaks, lambda key: split_suffix(key, PEFT_SUFFIXES + KOHYA_SUFFIXES))
