"""Diffusers <-> LDM names of the KL autoencoder (FORMATS.md §2.4), for any number of levels.

Decoder levels are numbered in reverse in LDM (`decoder.up.(n-1-i)` is diffusers `up_blocks.i`).
The mid-block attention is a 1x1 conv in LDM and a Linear in diffusers: `is_attention_weight`
tells the converter which tensors to reshape.
"""

from __future__ import annotations

import re

LDM_PREFIX = "first_stage_model."  # the VAE inside a single-file checkpoint

# Diffusers child of the mid-block attention -> LDM child. The second table holds the names
# diffusers used before 0.14 (still found in old folders), read but never written.
ATTENTION_PARTS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out", "group_norm": "norm"}
_OLD_ATTENTION_PARTS = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_ATTENTION_PARTS_BACK = {ldm: diffusers for diffusers, ldm in ATTENTION_PARTS.items()}
_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_RESNET_PARTS_BACK = {ldm: diffusers for diffusers, ldm in _RESNET_PARTS.items()}
_TOP_LEVEL = {
    f"{side}.{diffusers}": f"{side}.{ldm}"
    for side in ("encoder", "decoder")
    for diffusers, ldm in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out"))
} | {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}

_DIFFUSERS = re.compile(
    r"^(?P<side>encoder|decoder)\.(?:"
    r"(?P<blocks>down_blocks|up_blocks)\.(?P<i>\d+)\.(?P<kind>resnets|downsamplers|upsamplers)\.(?P<j>\d+)"
    r"|mid_block\.(?P<mid>resnets|attentions)\.(?P<m>\d+)"
    r")(?P<rest>(?:\..+)?)$"
)
_LDM = re.compile(
    r"^(?P<side>encoder|decoder)\.(?:"
    r"(?P<blocks>down|up)\.(?P<i>\d+)\.(?:(?P<kind>block)\.(?P<j>\d+)|(?P<sampler>downsample|upsample))"
    r"|mid\.(?:block_(?P<b>\d+)|(?P<attn>attn_1))"
    r")(?P<rest>(?:\..+)?)$"
)


def _top_level(path: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    return None


def _rename_child(rest: str, table: dict[str, str]) -> str:
    """Rename the first component of `.child.rest` if the table knows it, else leave it."""
    renamed = _top_level(rest[1:], table)
    return rest if renamed is None else "." + renamed


def _attention_child(rest: str, table: dict[str, str]) -> str | None:
    renamed = _rename_child(rest, table)
    return None if rest and renamed == rest else renamed


def diffusers_to_ldm_vae(path: str, levels: int) -> str | None:
    """LDM name (without `first_stage_model.`) of a diffusers AutoencoderKL path or key; None if none."""
    m = _DIFFUSERS.match(path)
    if not m:
        return _top_level(path, _TOP_LEVEL)
    side, rest = m["side"], m["rest"]
    if m["mid"] == "attentions":
        mapped = _attention_child(rest, {**ATTENTION_PARTS, **_OLD_ATTENTION_PARTS})
        return None if m["m"] != "0" or mapped is None else f"{side}.mid.attn_1{mapped}"
    if m["mid"] == "resnets":
        return f"{side}.mid.block_{int(m['m']) + 1}{_rename_child(rest, _RESNET_PARTS)}"
    i, j, kind = int(m["i"]), int(m["j"]), m["kind"]
    if i >= levels or (side == "encoder") != (m["blocks"] == "down_blocks"):
        return None
    level, name = (i, "down") if side == "encoder" else (levels - 1 - i, "up")
    if kind == "resnets":
        return f"{side}.{name}.{level}.block.{j}{_rename_child(rest, _RESNET_PARTS)}"
    if j != 0 or kind != ("downsamplers" if side == "encoder" else "upsamplers"):
        return None
    return f"{side}.{name}.{level}.{name}sample{rest}"


def ldm_to_diffusers_vae(path: str, levels: int) -> str | None:
    """Diffusers AutoencoderKL name of an LDM VAE path or key (without `first_stage_model.`); None if none."""
    m = _LDM.match(path)
    if not m:
        return _top_level(path, {ldm: diffusers for diffusers, ldm in _TOP_LEVEL.items()})
    side, rest = m["side"], m["rest"]
    if m["attn"]:
        mapped = _attention_child(rest, _ATTENTION_PARTS_BACK)
        return None if mapped is None else f"{side}.mid_block.attentions.0{mapped}"
    if m["b"]:
        b = int(m["b"])
        return None if b not in (1, 2) else f"{side}.mid_block.resnets.{b - 1}{_rename_child(rest, _RESNET_PARTS_BACK)}"
    level = int(m["i"])
    if level >= levels or (side == "encoder") != (m["blocks"] == "down"):
        return None
    i, blocks = (level, "down_blocks") if side == "encoder" else (levels - 1 - level, "up_blocks")
    if m["kind"]:
        return f"{side}.{blocks}.{i}.resnets.{m['j']}{_rename_child(rest, _RESNET_PARTS_BACK)}"
    if m["sampler"] != ("downsample" if side == "encoder" else "upsample"):
        return None
    return f"{side}.{blocks}.{i}.{m['sampler']}rs.0{rest}"


def is_attention_weight(ldm_key: str) -> bool:
    """The q/k/v/proj_out weights: 1x1 conv `[c, c, 1, 1]` in LDM, Linear `[c, c]` in diffusers."""
    return bool(re.match(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", ldm_key))
