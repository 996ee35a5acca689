"""Write a LoRA in a family's single-file layout (BFL, ComfyUI): split diffusers modules are fused exactly where
the layout fuses them (`lora.fused`), the rest renamed. The family says which Linears its layout has
(`FusedModule`s, in order) and how each dialect spells them.

kohya keeps each module's alpha. The ComfyUI/BFL dialect folds alpha / r into lora_B and writes no alpha, as the
diffusers writer does: ComfyUI reads it with or without alpha, InvokeAI with alpha = r.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.fused import fuse_full, fuse_split
from adapterzoo.formats.lora.lora_model import AdapterModule, FullModule, LoraFile, LoraModule
from adapterzoo.formats.lora.lora_write import fold_scale, kohya_parts
from adapterzoo.formats.model.targets import TRANSFORMER, FusedModule

Tensors = dict[str, torch.Tensor]
Named = list[tuple[str, AdapterModule]]


def layout_modules(lora: LoraFile, layout: Sequence[FusedModule], title: str) -> Named:
    """(layout name, module) for every transformer module of `lora`, fused where the layout fuses; `title` names
    the layout in refusals ("BFL", "ComfyUI")."""
    out, placed = [], set()
    for linear in layout:
        parts = {path: lora.modules[path] for path, _ in linear.parts if path in lora.modules}
        if not parts:
            continue
        placed.update(parts)
        if not linear.fused:
            out.append((linear.name, parts[linear.parts[0][0]]))
            continue
        if all(isinstance(module, FullModule) for module in parts.values()):
            out.append((linear.name, fuse_full(parts, linear)))
            continue
        others = [path for path, module in parts.items() if not isinstance(module, LoraModule)]
        if others:
            raise AdapterzooError(f"{others[0]} is not a plain LoRA, so it cannot be fused into {title}'s "
                                  f"{linear.name}; write diffusers or peft, or pass --rank N to make it one")
        out.append((linear.name, fuse_split(parts, linear)))
    left = [path for path in lora.modules if path.startswith(TRANSFORMER + ".") and path not in placed]
    if left:
        raise AdapterzooError(f"{len(left)} module(s) have no {title} name, e.g. {left[0]}; write diffusers or peft")
    return out


def kohya_named_tensors(named: Named, spell: Callable[[str], str]) -> Tensors:
    """kohya / LyCORIS parts with per-module alpha under `spell(name)`."""
    out: Tensors = {}
    for name, module in named:
        out.update({f"{spell(name)}.{part}": tensor.contiguous() for part, tensor in kohya_parts(module).items()})
    return out


def transformer_only(lora: LoraFile, dialect: str) -> None:
    """Refuse a LoRA that also patches text encoders: the dialect holds the transformer only."""
    encoders = sorted({lora.architecture.targets[p].component for p in lora.modules} - {TRANSFORMER})
    if encoders:
        raise AdapterzooError(f"the {dialect} dialect holds the transformer only, and this LoRA also patches "
                              f"{', '.join(encoders)}; write kohya, diffusers or peft")


def folded_tensors(named: Named, prefix: str, dialect: str) -> Tensors:
    """`<prefix><name>.lora_A/B.weight`, alpha / r folded into lora_B; plain LoRA modules only."""
    out: Tensors = {}
    for name, module in named:
        if not isinstance(module, LoraModule) or module.mid is not None or module.dora_scale is not None:
            raise AdapterzooError(f"{name}: the {dialect} dialect holds plain LoRA modules only")
        folded = fold_scale(module)
        out[f"{prefix}{name}.lora_A.weight"] = folded.down.contiguous()
        out[f"{prefix}{name}.lora_B.weight"] = folded.up.contiguous()
    return out
