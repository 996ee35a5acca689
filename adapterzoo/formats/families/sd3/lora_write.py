"""Write an SD3/SD3.5 LoRA in SAI's module space: kohya (`lora_unet_joint_blocks_0_x_block_attn_qkv`, sd-scripts'
lora_sd3 spelling; `lora_te1/2/3_` for CLIP-L, CLIP-G, T5) or ComfyUI's own (`diffusion_model.joint_blocks...
.lora_A/B`). Split diffusers q/k/v are fused exactly (`lora.fused`); the swapped final modulations move with
the rows. kohya keeps each module's alpha; the comfy dialect folds alpha / r into lora_B, as the diffusers
writer does. diffusers and PEFT output need no writer here: their keys are the canonical paths.
"""

from __future__ import annotations

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.families.sd3.modules import CONVENTION, T5, Sd3Architecture
from adapterzoo.formats.families.sd3.probe import COMFY_PREFIX
from adapterzoo.formats.lora.layout_write import (
    Named,
    folded_tensors,
    kohya_named_tensors,
    layout_modules,
    transformer_only,
)
from adapterzoo.formats.lora.lora_model import LoraFile
from adapterzoo.formats.model.targets import TRANSFORMER, flatten, relative

Tensors = dict[str, torch.Tensor]


def _sai_modules(lora: LoraFile) -> Named:
    """(SAI name, module) for every transformer module of `lora`, q/k/v fused into qkv."""
    if not isinstance(lora.architecture, Sd3Architecture):
        raise AdapterzooError(f"SAI names exist for SD3 LoRAs only; this one is for {lora.base}")
    return layout_modules(lora, lora.architecture.sai, "SAI")


def kohya_tensors(lora: LoraFile) -> Tensors:
    """sd-scripts' networks.lora_sd3 keys with per-module alpha; text encoders as `lora_te1/2/3_`."""
    encoders = []
    for path, module in lora.modules.items():
        target = lora.architecture.targets[path]
        if target.component != TRANSFORMER:
            spelled = relative(target) if target.component == T5 else f"text_model.{relative(target)}"
            encoders.append((f"{CONVENTION.prefixes[target.component][0]}_{flatten(spelled)}", module))
    return {**kohya_named_tensors(_sai_modules(lora), lambda name: f"lora_unet_{flatten(name)}"),
            **kohya_named_tensors(encoders, lambda name: name)}


def comfy_tensors(lora: LoraFile) -> Tensors:
    """`diffusion_model.<SAI name>.lora_A/B.weight`, alpha / r folded into lora_B; the transformer only."""
    transformer_only(lora, "comfy")
    return folded_tensors(_sai_modules(lora), COMFY_PREFIX, "comfy")
