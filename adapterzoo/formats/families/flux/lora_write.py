"""Write a Flux LoRA in BFL module space: kohya (`lora_unet_double_blocks_0_img_attn_qkv`, sd-scripts'
spelling, text encoders as `lora_te1_` CLIP-L and `lora_te3_` T5) or BFL/ComfyUI-native
(`diffusion_model.<BFL name>.lora_A/B`, alpha folded). Split diffusers modules are fused exactly
(`lora.layout_write`). diffusers and PEFT output need no Flux writer: their keys are the canonical paths.
"""

from __future__ import annotations

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.families.flux.modules import CLIP_L, FLUX_CONVENTION, FluxArchitecture
from adapterzoo.formats.families.flux.probe import BFL_PREFIX
from adapterzoo.formats.lora.layout_write import folded_tensors, kohya_named_tensors, layout_modules, transformer_only
from adapterzoo.formats.lora.lora_model import LoraFile
from adapterzoo.formats.model.targets import TRANSFORMER, flatten, relative

Tensors = dict[str, torch.Tensor]


def _flux(lora: LoraFile) -> FluxArchitecture:
    if not isinstance(lora.architecture, FluxArchitecture):
        raise AdapterzooError(f"BFL names exist for Flux LoRAs only; this one is for {lora.base}")
    return lora.architecture


def kohya_tensors(lora: LoraFile) -> Tensors:
    """sd-scripts' networks.lora_flux keys with per-module alpha."""
    named = [(f"lora_unet_{flatten(name)}", module) for name, module in layout_modules(lora, _flux(lora).bfl, "BFL")]
    for path, module in lora.modules.items():
        target = lora.architecture.targets[path]
        if target.component == TRANSFORMER:
            continue
        prefix = FLUX_CONVENTION.prefixes[target.component][0]
        spelled = "text_model." + relative(target) if target.component == CLIP_L else relative(target)
        named.append((f"{prefix}_{flatten(spelled)}", module))
    return kohya_named_tensors(named, lambda name: name)


def bfl_tensors(lora: LoraFile) -> Tensors:
    """`diffusion_model.<BFL name>.lora_A/B.weight`, alpha / r folded into lora_B; transformer only."""
    layout = _flux(lora).bfl
    transformer_only(lora, "bfl")
    return folded_tensors(layout_modules(lora, layout, "BFL"), BFL_PREFIX, "bfl")
