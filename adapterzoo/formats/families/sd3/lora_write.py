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
from adapterzoo.formats.lora.fused import fuse_full, fuse_split
from adapterzoo.formats.lora.lora_model import AdapterModule, FullModule, LoraFile, LoraModule
from adapterzoo.formats.lora.lora_write import fold_scale, kohya_parts
from adapterzoo.formats.model.targets import TRANSFORMER, flatten, relative

Tensors = dict[str, torch.Tensor]


def _sai_modules(lora: LoraFile) -> list[tuple[str, AdapterModule]]:
    """(SAI name, module) for every transformer module of `lora`, q/k/v fused into qkv."""
    architecture = lora.architecture
    if not isinstance(architecture, Sd3Architecture):
        raise AdapterzooError(f"SAI names exist for SD3 LoRAs only; this one is for {lora.base}")
    out, placed = [], set()
    for linear in architecture.sai:
        parts = {path: lora.modules[path] for path, _ in linear.parts if path in lora.modules}
        if not parts:
            continue
        placed.update(parts)
        if not linear.fused:
            out.append((linear.name, parts[linear.parts[0][0]]))
        elif all(isinstance(module, FullModule) for module in parts.values()):
            out.append((linear.name, fuse_full(parts, linear)))
        elif others := [path for path, module in parts.items() if not isinstance(module, LoraModule)]:
            raise AdapterzooError(f"{others[0]} is not a plain LoRA, so it cannot be fused into SAI's {linear.name}; "
                                  "write diffusers or peft, or pass --rank N to make it one")
        else:
            out.append((linear.name, fuse_split(parts, linear)))
    left = [path for path in lora.modules if path.startswith(TRANSFORMER + ".") and path not in placed]
    if left:
        raise AdapterzooError(f"{len(left)} module(s) have no SAI name, e.g. {left[0]}; write diffusers or peft")
    return out


def kohya_tensors(lora: LoraFile) -> Tensors:
    """sd-scripts' networks.lora_sd3 keys with per-module alpha."""
    names = [(f"lora_unet_{flatten(name)}", module) for name, module in _sai_modules(lora)]
    for path, module in lora.modules.items():
        target = lora.architecture.targets[path]
        if target.component != TRANSFORMER:
            rel = relative(target)
            spelled = rel if target.component == T5 else f"text_model.{rel}"
            names.append((f"{CONVENTION.prefixes[target.component][0]}_{flatten(spelled)}", module))
    out: Tensors = {}
    for name, module in names:
        out.update({f"{name}.{part}": tensor.contiguous() for part, tensor in kohya_parts(module).items()})
    return out


def comfy_tensors(lora: LoraFile) -> Tensors:
    """`diffusion_model.<SAI name>.lora_A/B.weight`, alpha / r folded into lora_B; the transformer only."""
    encoders = sorted({lora.architecture.targets[p].component for p in lora.modules} - {TRANSFORMER})
    if encoders:
        raise AdapterzooError(f"the comfy dialect holds the transformer only, and this LoRA also patches "
                              f"{', '.join(encoders)}; write kohya, diffusers or peft")
    out: Tensors = {}
    for name, module in _sai_modules(lora):
        if not isinstance(module, LoraModule) or module.mid is not None or module.dora_scale is not None:
            raise AdapterzooError(f"{name}: the comfy dialect holds plain LoRA modules only; write kohya")
        folded = fold_scale(module)
        out[f"{COMFY_PREFIX}{name}.lora_A.weight"] = folded.down.contiguous()
        out[f"{COMFY_PREFIX}{name}.lora_B.weight"] = folded.up.contiguous()
    return out
