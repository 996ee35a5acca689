"""Hugging Face CLIP text-encoder keys <-> OpenCLIP keys (FORMATS.md §2.2).

SD2's and SDXL's second text encoder are OpenCLIP in single files: q, k and v are one fused
`attn.in_proj_weight` `[3d, d]` (rows in the order q, k, v) and `text_projection` is used as
`x @ P`, the transpose of HF's `text_projection.weight`. OpenCLIP names here are relative to the
model root (`cond_stage_model.model.`, `conditioner.embedders.1.model.`); HF names are written
without transformers' optional `text_model.` level.
"""

from __future__ import annotations

import re

import torch

QKV = ("q_proj", "k_proj", "v_proj")
TRANSPOSED = "text_projection"  # OpenCLIP name of the one tensor stored transposed

_GLOBAL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": TRANSPOSED,
}
_GLOBAL_BACK = {openclip: hf for hf, openclip in _GLOBAL.items()}
_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_LAYER_PARTS_BACK = {openclip: hf for hf, openclip in _LAYER_PARTS.items()}
_HF_LAYER = re.compile(r"^encoder\.layers\.(?P<n>\d+)\.(?P<part>.+)\.(?P<param>weight|bias)$")
_OPENCLIP_LAYER = re.compile(r"^transformer\.resblocks\.(?P<n>\d+)\.(?P<part>.+?)[._](?P<param>weight|bias)$")


def is_openclip_root(prefix: str) -> bool:
    return prefix.endswith(".model.")


def strip_text_model(key: str) -> str:
    """HF CLIP key without the `text_model.` level that older transformers and LDM files spell."""
    return key.removeprefix("text_model.")


def hf_to_openclip(key: str) -> tuple[str, int | None] | None:
    """(OpenCLIP key, row block 0/1/2 inside a fused in_proj or None) for an HF CLIP text key."""
    key = strip_text_model(key)
    if key in _GLOBAL:
        return _GLOBAL[key], None
    m = _HF_LAYER.match(key)
    if not m:
        return None
    layer, part, param = m["n"], m["part"], m["param"]
    if part.startswith("self_attn.") and part.removeprefix("self_attn.") in QKV:
        return f"transformer.resblocks.{layer}.attn.in_proj_{param}", QKV.index(part.removeprefix("self_attn."))
    if part not in _LAYER_PARTS:
        return None
    return f"transformer.resblocks.{layer}.{_LAYER_PARTS[part]}.{param}", None


def openclip_to_hf(key: str) -> list[str] | None:
    """HF keys for an OpenCLIP key: q, k, v for a fused in_proj, else one; None if it has no HF twin."""
    if key in _GLOBAL_BACK:
        return [_GLOBAL_BACK[key]]
    m = _OPENCLIP_LAYER.match(key)
    if not m:
        return None
    layer, part, param = m["n"], m["part"], m["param"]
    fused = key.endswith(f"_{param}")  # nn.MultiheadAttention's in_proj_weight / in_proj_bias
    if part == "attn.in_proj" and fused:
        return [f"encoder.layers.{layer}.self_attn.{proj}.{param}" for proj in QKV]
    if part not in _LAYER_PARTS_BACK or fused:
        return None
    return [f"encoder.layers.{layer}.{_LAYER_PARTS_BACK[part]}.{param}"]


def split_in_proj(fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from a fused `[3d, ...]` in_proj weight or bias."""
    q, k, v = fused.chunk(3, dim=0)
    return q, k, v


def fuse_in_proj(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([q, k, v], dim=0)
