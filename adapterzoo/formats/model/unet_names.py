"""Diffusers <-> LDM UNet names by the block arithmetic of FORMATS.md §2.1, for any UNet shape.

The mapping works on module paths (`down_blocks.1.resnets.0.conv1`); a trailing parameter name
(`.weight`, `.bias`) passes through, so the same functions rename state-dict keys. LoRA conversion
and LoRA merging into single-file checkpoints use the module form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapterzoo.errors import AdapterzooError

LDM_PREFIX = "model.diffusion_model."  # the UNet inside a single-file checkpoint

# ResnetBlock2D child -> LDM ResBlock child.
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_PARTS_BACK = {ldm: diffusers for diffusers, ldm in RESNET_PARTS.items()}

# Modules outside the down/mid/up blocks.
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_TOP_LEVEL_BACK = {ldm: diffusers for diffusers, ldm in TOP_LEVEL.items()}

_DIFFUSERS_BLOCK = re.compile(
    r"^(?P<side>down_blocks|up_blocks)\.(?P<i>\d+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)"
    r"\.(?P<j>\d+)(?P<rest>(?:\..+)?)$"
)
_DIFFUSERS_MID = re.compile(r"^mid_block\.(?P<kind>resnets|attentions)\.(?P<j>\d+)(?P<rest>(?:\..+)?)$")
_LDM_BLOCK = re.compile(r"^(?P<side>input_blocks|output_blocks)\.(?P<n>\d+)\.(?P<k>\d+)(?P<rest>(?:\..+)?)$")
_LDM_MID = re.compile(r"^middle_block\.(?P<k>\d+)(?P<rest>(?:\..+)?)$")


@dataclass(frozen=True)
class UnetLayout:
    """What the block arithmetic depends on: resnets per level and which blocks carry attention."""

    layers_per_block: int
    down_attention: tuple[bool, ...]  # per level, diffusers down_blocks order
    up_attention: tuple[bool, ...]  # per level, diffusers up_blocks order (deepest first)

    @property
    def levels(self) -> int:
        return len(self.down_attention)


def layout_from_config(config: dict) -> UnetLayout:
    """Layout of a diffusers UNet2DConditionModel config; refuses shapes LDM files cannot express."""
    layers = config.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise AdapterzooError(f"layers_per_block {list(layers)} differs per level; LDM files need one value")
        layers = layers[0]
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        raise AdapterzooError(f"mid block {mid!r} has no LDM single-file layout (UNetMidBlock2DCrossAttn only)")
    down = tuple("CrossAttn" in t for t in config["down_block_types"])
    up = tuple("CrossAttn" in t for t in config["up_block_types"])
    if len(down) != len(up):
        raise AdapterzooError(f"{len(down)} down blocks but {len(up)} up blocks")
    return UnetLayout(int(layers), down, up)


def _resnet_to_ldm(rest: str) -> str | None:
    if not rest:
        return ""
    parts = rest[1:].split(".", 1)
    if parts[0] not in RESNET_PARTS:
        return None
    return "." + RESNET_PARTS[parts[0]] + ("." + parts[1] if len(parts) > 1 else "")


def _resnet_to_diffusers(rest: str) -> str | None:
    if not rest:
        return ""
    for ldm, diffusers in _RESNET_PARTS_BACK.items():
        if rest[1:] == ldm or rest[1:].startswith(ldm + "."):
            return "." + diffusers + rest[1 + len(ldm):]
    return None


def _sampler_rest(rest: str, diffusers_child: str, ldm_child: str, to_ldm: bool) -> str | None:
    """Down/Upsample modules: only their conv child (`conv` <-> `op` / `conv`) holds weights."""
    if not rest:
        return ""
    src, dst = (diffusers_child, ldm_child) if to_ldm else (ldm_child, diffusers_child)
    parts = rest[1:].split(".", 1)
    if parts[0] != src:
        return None
    return "." + dst + ("." + parts[1] if len(parts) > 1 else "")


def _top_level(path: str, table: dict[str, str]) -> str | None:
    for name, target in table.items():
        if path == name or path.startswith(name + "."):
            return target + path[len(name):]
    return None


def diffusers_to_ldm_module(path: str, layout: UnetLayout) -> str | None:
    """LDM name (without `model.diffusion_model.`) of a diffusers UNet module path or key; None if none."""
    top = _top_level(path, TOP_LEVEL)
    if top is not None:
        return top
    per_level = layout.layers_per_block + 1
    m = _DIFFUSERS_MID.match(path)
    if m:
        j, rest = int(m["j"]), m["rest"]
        if m["kind"] == "attentions":
            return f"middle_block.1{rest}" if j == 0 else None
        mapped = _resnet_to_ldm(rest)
        return None if j > 1 or mapped is None else f"middle_block.{2 * j}{mapped}"
    m = _DIFFUSERS_BLOCK.match(path)
    if not m:
        return None
    i, j, kind, rest = int(m["i"]), int(m["j"]), m["kind"], m["rest"]
    if i >= layout.levels:
        return None
    if m["side"] == "down_blocks":
        if kind == "downsamplers":
            mapped = _sampler_rest(rest, "conv", "op", to_ldm=True)
            if j != 0 or i == layout.levels - 1 or mapped is None:
                return None
            return f"input_blocks.{per_level * (i + 1)}.0{mapped}"
        if kind == "upsamplers" or j >= layout.layers_per_block:
            return None
        n = per_level * i + j + 1
    else:
        if kind == "downsamplers":
            return None
        if kind == "upsamplers":
            mapped = _sampler_rest(rest, "conv", "conv", to_ldm=True)
            if j != 0 or i == layout.levels - 1 or mapped is None:
                return None
            slot = 2 if layout.up_attention[i] else 1
            return f"output_blocks.{per_level * i + layout.layers_per_block}.{slot}{mapped}"
        if j > layout.layers_per_block:
            return None
        n = per_level * i + j
    side = "input_blocks" if m["side"] == "down_blocks" else "output_blocks"
    if kind == "attentions":
        attention = layout.down_attention if side == "input_blocks" else layout.up_attention
        return f"{side}.{n}.1{rest}" if attention[i] else None
    mapped = _resnet_to_ldm(rest)
    return None if mapped is None else f"{side}.{n}.0{mapped}"


def ldm_to_diffusers_module(path: str, layout: UnetLayout) -> str | None:
    """Diffusers name of an LDM UNet module path or key (without `model.diffusion_model.`); None if none."""
    top = _top_level(path, _TOP_LEVEL_BACK)
    if top is not None:
        return top
    per_level = layout.layers_per_block + 1
    m = _LDM_MID.match(path)
    if m:
        k, rest = int(m["k"]), m["rest"]
        if k == 1:
            return f"mid_block.attentions.0{rest}"
        mapped = _resnet_to_diffusers(rest)
        return None if k not in (0, 2) or mapped is None else f"mid_block.resnets.{k // 2}{mapped}"
    m = _LDM_BLOCK.match(path)
    if not m:
        return None
    n, k, rest = int(m["n"]), int(m["k"]), m["rest"]
    if m["side"] == "input_blocks":
        if n == 0:
            return None  # conv_in is input_blocks.0.0, handled as a top-level name
        i, j = divmod(n - 1, per_level)
        if i >= layout.levels:
            return None
        if j == layout.layers_per_block:
            mapped = _sampler_rest(rest, "conv", "op", to_ldm=False)
            if k != 0 or i == layout.levels - 1 or mapped is None:
                return None
            return f"down_blocks.{i}.downsamplers.0{mapped}"
        block, attention = f"down_blocks.{i}", layout.down_attention[i]
    else:
        i, j = divmod(n, per_level)
        if i >= layout.levels:
            return None
        attention = layout.up_attention[i]
        upsampler_slot = 2 if attention else 1
        if k == upsampler_slot and j == layout.layers_per_block and i < layout.levels - 1:
            mapped = _sampler_rest(rest, "conv", "conv", to_ldm=False)
            return None if mapped is None else f"up_blocks.{i}.upsamplers.0{mapped}"
        block = f"up_blocks.{i}"
    if k == 1 and attention:
        return f"{block}.attentions.{j}{rest}"
    mapped = _resnet_to_diffusers(rest)
    return None if k != 0 or mapped is None else f"{block}.resnets.{j}{mapped}"
