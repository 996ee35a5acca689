"""Exact LoRA math between a fused projection (BFL's qkv) and the split modules its rows belong to (FLUX.md §2).
No SVD; the rows come from the family's `FusedModule`.

Fused -> split: each part keeps the whole down and alpha and takes its rows of up, so ΔW_part is exactly
the part's rows of ΔW. Split -> fused: parts that share one down and alpha (the split of a fused LoRA)
get it back with their ups put into their rows; otherwise downs are stacked and up is block-diagonal
(rank summed), each part's scale kept in alpha when all agree, else folded into its up block.
Rows of a fused module that no part covers get zero rows of up. LyCORIS modules (LoKr, LoHa) on a fused
projection have no per-row factors: each part gets its rows of the scaled ΔW as a full (`diff`) module.
"""

from __future__ import annotations

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.lora_model import AdapterModule, FullModule, LoraModule, dora_on_output
from adapterzoo.formats.model.targets import FusedModule, Rows


def _rows_of(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    return torch.cat([tensor[lo:hi] for lo, hi in rows]) if len(rows) > 1 else tensor[rows[0][0]:rows[0][1]]


def split_fused(module: LoraModule, fused: FusedModule, shapes: dict[str, tuple[int, ...]]) -> dict[str, LoraModule]:
    """One LoRA per part of a fused module: the same down and alpha, the part's rows of up (and DoRA scale)."""
    if module.dora_scale is not None and not dora_on_output(module.dora_scale):
        raise AdapterzooError(f"{fused.name}: a DoRA scale per input column cannot be split into "
                              "its q, k, v parts exactly")
    parts = {}
    for path, rows in fused.parts:
        dora = None if module.dora_scale is None else _rows_of(module.dora_scale, rows)
        up = _rows_of(module.up, rows).contiguous()
        parts[path] = LoraModule(module.down.clone(), up, module.alpha, shapes[path], dora_scale=dora)
    return parts


def _shares_down(modules: list[LoraModule]) -> bool:
    first = modules[0]
    return all(m.alpha == first.alpha and m.down.dtype == first.down.dtype and m.down.shape == first.down.shape
               and torch.equal(m.down, first.down) for m in modules[1:])


def fuse_split(parts: dict[str, LoraModule], fused: FusedModule) -> LoraModule:
    """One LoRA on the fused module from LoRAs on (some of) its parts; ΔW equal to theirs row for row."""
    present = [(path, rows, parts[path]) for path, rows in fused.parts if path in parts]
    modules = [m for _, _, m in present]
    if any(m.dora_scale is not None or m.mid is not None for m in modules):
        raise AdapterzooError(f"{fused.name}: DoRA parts cannot be fused into one module exactly")
    dtype = modules[0].up.dtype
    if _shares_down(modules):
        down, alpha = modules[0].down, modules[0].alpha
        blocks = [(rows, m.up.float(), 0) for _, rows, m in present]
    else:
        down = torch.cat([m.down.to(modules[0].down.dtype) for m in modules])
        scales = {m.scale for m in modules}
        common = scales.pop() if len(scales) == 1 else None
        alpha = common * down.shape[0] if common is not None else float(down.shape[0])
        blocks, column = [], 0
        for _, rows, m in present:
            factor = 1.0 if common is not None else m.scale
            blocks.append((rows, m.up.float() * factor, column))
            column += m.rank
    up = torch.zeros(fused.shape[0], down.shape[0], dtype=torch.float32)
    for rows, block, column in blocks:
        start = 0
        for lo, hi in rows:
            up[lo:hi, column:column + block.shape[1]] = block[start:start + hi - lo]
            start += hi - lo
    return LoraModule(down, up.to(dtype), alpha, fused.shape)


def split_full(module: AdapterModule, fused: FusedModule, shapes: dict[str, tuple[int, ...]]) -> dict[str, FullModule]:
    """Each part's rows of a LyCORIS module's ΔW, exactly, as full modules (DoRA needs W: refused)."""
    if getattr(module, "dora_scale", None) is not None or not hasattr(module, "scaled_delta"):
        raise AdapterzooError(f"{fused.name}: a {type(module).__name__.removesuffix('Module')} module that needs "
                              "the base weight cannot be split into its parts")
    delta = module.scaled_delta().reshape(fused.shape)
    return {path: FullModule(_rows_of(delta, rows).contiguous(), shapes[path]) for path, rows in fused.parts}


def fuse_full(parts: dict[str, FullModule], fused: FusedModule) -> FullModule:
    """Full modules on (some of) a fused module's parts as one full module; rows no part covers stay zero."""
    diff = torch.zeros(fused.shape, dtype=torch.float32)
    for path, rows in fused.parts:
        if path in parts:
            block, start = parts[path].diff.float().reshape(parts[path].shape), 0
            for lo, hi in rows:
                diff[lo:hi] = block[start:start + hi - lo]
                start += hi - lo
    return FullModule(diff.to(next(iter(parts.values())).diff.dtype), fused.shape)
