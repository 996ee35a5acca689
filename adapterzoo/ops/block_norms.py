"""Where a LoRA acts: ‖ΔW‖_F of each module, from its factors without forming ΔW, summed over the blocks of
the UNet or transformer (and the layers of each text encoder) it patches.

For a LoRA ΔW = s·B·A (B [out, r], A [r, in]): ‖BA‖²_F = tr((BᵀB)(AAᵀ)), two r×r Gram matrices. LoHa
(B₁A₁)⊙(B₂A₂) is the product of the row-wise Khatri–Rao factors, rank r₁r₂, the same way; LoKr
‖w₁⊗w₂‖_F = ‖w₁‖_F·‖w₂‖_F. Full diffs are measured as stored. DoRA's renormalisation and IA3 need the
model's weights and are left out (the norm is of s·ΔW before DoRA). The scale s is alpha/r where the file
stores alpha, else 1 (a PEFT file keeps alpha in its config): the picture is of shares, not absolute sizes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.tensor_source import TensorSource, open_checkpoint_file
from adapterzoo.formats.lora.lora_keys import detect_lora_dialect, group_modules
from adapterzoo.formats.lora.lora_parts import DOWN_PARTS, UP_PARTS

# (pattern over the module name with '.' or '_' between words, label, order key) — most specific first
_BLOCKS = [
    (re.compile(r"single_transformer_blocks[._](\d+)|single_blocks[._](\d+)"), "single {}", 3000),
    (re.compile(r"(?:double_blocks|(?<!single_)transformer_blocks)[._](\d+)"), "double {}", 2000),
    (re.compile(r"down_blocks[._](\d+)"), "down {}", 0),
    (re.compile(r"input_blocks[._](\d+)"), "in {}", 0),
    (re.compile(r"mid_block|middle_block"), "mid", 500),
    (re.compile(r"up_blocks[._](\d+)"), "up {}", 1000),
    (re.compile(r"output_blocks[._](\d+)"), "out {}", 1000),
]
_UNET_FIRST = re.compile(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block")
_TEXT = re.compile(r"^(?:lora_)?(te\d?|text_encoder(?:_\d)?|clip_l|t5xxl)[._]")
_LAYER = re.compile(r"layers[._](\d+)|block[._](\d+)")


@dataclass(frozen=True)
class Block:
    """One cell of the heat map: a block of one component, its ‖ΔW‖_F (root of the modules' squared norms)."""

    component: str  # unet (the UNet or the transformer) or a text encoder: te, te1, te2, ...
    label: str  # down 0, mid, up 2, double 7, single 30, layer 11, other
    order: int
    norm: float
    modules: int


def block_norms(path: str | os.PathLike) -> list[Block]:
    """The file's blocks in model order (text encoders after the UNet/transformer), each with its norm."""
    squares: dict[tuple[str, str, int], list[float]] = {}
    for name, norm in module_norms(path).items():
        key = _place(name)
        squares.setdefault(key, []).append(norm * norm)
    blocks = [Block(component, label, order, math.sqrt(sum(values)), len(values))
              for (component, label, order), values in squares.items()]
    return sorted(blocks, key=lambda b: (b.component != "unet", b.component, b.order, b.label))


def module_norms(path: str | os.PathLike) -> dict[str, float]:
    """Module name as the file spells it -> ‖s·ΔW‖_F, for every module whose norm needs no model weights."""
    source = open_checkpoint_file(Path(path))
    dialect = detect_lora_dialect(list(source.shapes))
    if dialect is None:
        raise BadFileError("no LoRA-family keys in this file")
    norms = {}
    with torch.no_grad():
        for name, parts in group_modules(list(source.shapes), dialect).items():
            norm = _norm(source, parts)
            if norm is not None and math.isfinite(norm):
                norms[name] = norm
    return norms


def _place(name: str) -> tuple[str, str, int]:
    """(component, block label, order) of a module name in any dialect's spelling."""
    text = _TEXT.match(name.removeprefix("base_model.model."))
    if text:
        layer = _LAYER.search(name)
        number = next((int(g) for g in layer.groups() if g is not None), 0) if layer else -1
        return text.group(1), f"layer {number}" if layer else "other", number
    for pattern, label, order in _BLOCKS:
        if label.startswith(("double", "single")) and _UNET_FIRST.search(name):
            continue  # an SD UNet's attentions hold transformer_blocks too: those belong to their UNet block
        found = pattern.search(name)
        if found:
            number = next((int(g) for g in found.groups() if g is not None), 0)
            return "unet", label.format(number), order + number
    return "unet", "other", 9999


def _tensor(source: TensorSource, parts: dict[str, str], name: str) -> torch.Tensor | None:
    return source.get(parts[name]).double() if name in parts else None


def _scale(source: TensorSource, parts: dict[str, str], rank: int) -> float:
    alpha = _tensor(source, parts, "alpha")
    return float(alpha.reshape(-1)[0]) / rank if alpha is not None and alpha.numel() and rank else 1.0


def _low_rank_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """‖up @ down‖_F from r×r Gram matrices: up [out, r], down [r, in]."""
    value = torch.trace((up.T @ up) @ (down @ down.T))
    return math.sqrt(max(float(value), 0.0))


def _product(source: TensorSource, parts: dict[str, str], a: str, b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor pair as matrices: left [out, r], right [r, in]."""
    return source.get(parts[a]).double().flatten(1), source.get(parts[b]).double().flatten(1)


def _norm(source: TensorSource, parts: dict[str, str]) -> float | None:
    down_key = next((p for p in DOWN_PARTS if p in parts), None)
    up_key = next((p for p in UP_PARTS if p in parts), None)
    if down_key and up_key:
        down, up = source.get(parts[down_key]).double(), source.get(parts[up_key]).double()
        rank = int(down.shape[0])
        down = down.flatten(1)
        mid = _tensor(source, parts, "lora_mid.weight")
        if mid is not None:  # Tucker core [r, r, k, k] folded into the down factor: [r, in·k·k]
            down = torch.einsum("abhw,bi->aihw", mid, down).flatten(1)
        return _scale(source, parts, rank) * _low_rank_norm(up.flatten(1), down)
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts.keys() and not parts.keys() & {"hada_t1",
                                                                                                    "hada_t2"}:
        a1, b1 = _product(source, parts, "hada_w1_a", "hada_w1_b")
        a2, b2 = _product(source, parts, "hada_w2_a", "hada_w2_b")
        left = (a1[:, :, None] * a2[:, None, :]).flatten(1)  # [out, r1·r2]
        right = (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)  # [r1·r2, in]
        return _scale(source, parts, int(b1.shape[0])) * _low_rank_norm(left, right)
    if parts.keys() & {"lokr_w1", "lokr_w1_a"} and parts.keys() & {"lokr_w2", "lokr_w2_a"} and "lokr_t2" not in parts:
        w1 = _factor_norm(source, parts, "lokr_w1")
        w2 = _factor_norm(source, parts, "lokr_w2")
        inner = _tensor(source, parts, "lokr_w1_b")
        inner = inner if inner is not None else _tensor(source, parts, "lokr_w2_b")
        scale = 1.0 if inner is None else _scale(source, parts, int(inner.shape[0]))
        return scale * w1 * w2
    diff = _tensor(source, parts, "diff")
    return float(diff.norm()) if diff is not None else None


def _factor_norm(source: TensorSource, parts: dict[str, str], name: str) -> float:
    """‖w‖_F of a LoKr factor kept whole, or of w_a @ w_b."""
    whole = _tensor(source, parts, name)
    if whole is not None:
        return float(whole.norm())
    left, right = _product(source, parts, f"{name}_a", f"{name}_b")
    return _low_rank_norm(left, right)
