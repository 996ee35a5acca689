"""Write a Flux LoRA in BFL module space: kohya (`lora_unet_double_blocks_0_img_attn_qkv`, sd-scripts'
spelling, text encoders as `lora_te1_` CLIP-L and `lora_te3_` T5) or BFL/ComfyUI-native
(`diffusion_model.<BFL name>.lora_A/B`). Split diffusers modules are fused exactly (`lora.fused`).

kohya keeps each module's alpha. The BFL dialect folds alpha / r into lora_B and writes no alpha, as
the diffusers writer does: InvokeAI reads these files with alpha = r, ComfyUI with or without alpha.
diffusers and PEFT output need no Flux writer: their keys are the canonical paths.
"""

from __future__ import annotations

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.families.flux.modules import CLIP_L, FLUX_CONVENTION, FluxArchitecture
from adapterzoo.formats.families.flux.probe import BFL_PREFIX
from adapterzoo.formats.lora.fused import fuse_full, fuse_split
from adapterzoo.formats.lora.lora_model import AdapterModule, FullModule, LoraFile, LoraModule
from adapterzoo.formats.lora.lora_write import fold_scale, kohya_parts
from adapterzoo.formats.model.targets import TRANSFORMER, flatten, relative

Tensors = dict[str, torch.Tensor]


def _flux(lora: LoraFile) -> FluxArchitecture:
    if not isinstance(lora.architecture, FluxArchitecture):
        raise AdapterzooError(f"BFL names exist for Flux LoRAs only; this one is for {lora.base}")
    return lora.architecture


def _bfl_modules(lora: LoraFile) -> list[tuple[str, AdapterModule]]:
    """(BFL name, module) for every transformer module of `lora`, fused where BFL fuses."""
    out, placed = [], set()
    for bfl in _flux(lora).bfl:
        parts = {path: lora.modules[path] for path, _ in bfl.parts if path in lora.modules}
        if not parts:
            continue
        placed.update(parts)
        if not bfl.fused:
            out.append((bfl.name, parts[bfl.parts[0][0]]))
            continue
        if all(isinstance(module, FullModule) for module in parts.values()):
            out.append((bfl.name, fuse_full(parts, bfl)))
            continue
        others = [path for path, module in parts.items() if not isinstance(module, LoraModule)]
        if others:
            raise AdapterzooError(f"{others[0]} is not a plain LoRA, so it cannot be fused into BFL's {bfl.name}; "
                                  "write diffusers or peft, or pass --rank N to make it one")
        out.append((bfl.name, fuse_split(parts, bfl)))
    left = [path for path in lora.modules if path.startswith(TRANSFORMER + ".") and path not in placed]
    if left:
        raise AdapterzooError(f"{len(left)} module(s) have no BFL name, e.g. {left[0]}; write diffusers or peft")
    return out


def kohya_tensors(lora: LoraFile) -> Tensors:
    """sd-scripts' networks.lora_flux keys with per-module alpha."""
    out: Tensors = {}
    names = [(f"lora_unet_{flatten(name)}", module) for name, module in _bfl_modules(lora)]
    for path, module in lora.modules.items():
        target = lora.architecture.targets[path]
        if target.component == TRANSFORMER:
            continue
        prefix = FLUX_CONVENTION.prefixes[target.component][0]
        spelled = "text_model." + relative(target) if target.component == CLIP_L else relative(target)
        names.append((f"{prefix}_{flatten(spelled)}", module))
    for name, module in names:
        out.update({f"{name}.{part}": tensor.contiguous() for part, tensor in kohya_parts(module).items()})
    return out


def bfl_tensors(lora: LoraFile) -> Tensors:
    """`diffusion_model.<BFL name>.lora_A/B.weight`, alpha / r folded into lora_B; transformer only."""
    encoders = sorted({_flux(lora).targets[p].component for p in lora.modules} - {TRANSFORMER})
    if encoders:
        raise AdapterzooError(f"the bfl dialect holds the transformer only, and this LoRA also patches "
                              f"{', '.join(encoders)}; write kohya, diffusers or peft")
    out: Tensors = {}
    for name, module in _bfl_modules(lora):
        if not isinstance(module, LoraModule) or module.mid is not None or module.dora_scale is not None:
            raise AdapterzooError(f"{name}: the bfl dialect holds plain LoRA modules only")
        folded = fold_scale(module)
        out[f"{BFL_PREFIX}{name}.lora_A.weight"] = folded.down.contiguous()
        out[f"{BFL_PREFIX}{name}.lora_B.weight"] = folded.up.contiguous()
    return out
