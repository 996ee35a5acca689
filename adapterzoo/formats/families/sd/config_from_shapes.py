"""Diffusers configs of a single-file checkpoint's parts, inferred from tensor shapes alone (no hub).

Everything that shapes the weights is read from them: channels, resnets per level, which levels
attend, transformer depth, context width, linear vs conv projection (the VAE's and CLIP's configs are in
`checkpoint.shape_reading`, which every family shares). What the weights cannot tell (attention heads, group-norm groups,
the VAE scaling factor) follows the LDM configs each base ships with (FORMATS.md §2, §5).
"""

from __future__ import annotations

import re

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.shape_reading import HEAD_WIDTH, NORM_GROUPS, Shapes, count, heads_for, indices, need
from adapterzoo.formats.model.unet_names import UnetLayout

SD1_HEADS = 8  # SD1 (num_heads: 8)
UNET_SAMPLE_SIZE = {"sd1": 64, "sd2": 96, "sdxl": 128}
VAE_SAMPLE_SIZE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
# CLIP's own special-token ids as its Hugging Face configs spell them (eos 2 selects the
# argmax-of-ids pooling that SD's text encoders were trained with).


def _unet_heads(channels: list[int], base: str) -> int | list[int]:
    """SD1 attends with 8 heads per block, SD2 and SDXL with heads 64 wide (diffusers calls both attention_head_dim)."""
    if base == "sd1" and all(c % SD1_HEADS == 0 for c in channels):
        return SD1_HEADS
    return [heads_for(c, HEAD_WIDTH) for c in channels]


def unet_layout_from_ldm(shapes: Shapes) -> UnetLayout:
    """Resnets per level and attention levels from the LDM block numbering (FORMATS.md §2.1)."""
    inputs = count(shapes, r"^input_blocks\.(\d+)\.")
    outputs = count(shapes, r"^output_blocks\.(\d+)\.")
    downsamplers = indices(shapes, r"^input_blocks\.(\d+)\.0\.op\.weight$")
    levels = len(downsamplers) + 1
    layers, remainder = divmod(inputs - 1 - len(downsamplers), levels)
    per_level = layers + 1
    if (
        layers < 1
        or remainder
        or downsamplers != [per_level * (i + 1) for i in range(levels - 1)]
        or outputs != levels * per_level
    ):
        raise BadFileError(
            f"UNet block numbering does not fit the LDM layout ({inputs} input blocks, {outputs} output blocks, "
            f"downsamplers at {downsamplers})"
        )
    down = tuple(any(k.startswith(f"input_blocks.{per_level * i + 1}.1.") for k in shapes) for i in range(levels))
    up = tuple(any(k.startswith(f"output_blocks.{per_level * i}.1.transformer") for k in shapes) for i in range(levels))
    return UnetLayout(layers, down, up)


def unet_layout_from_diffusers(shapes: Shapes) -> UnetLayout:
    """Resnets per level and attention levels from diffusers UNet keys (a UNet saved on its own, without config)."""
    levels = count(shapes, r"^down_blocks\.(\d+)\.")
    if not levels:
        raise BadFileError("the UNet has no down_blocks; cannot infer its configuration")
    down = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in shapes) for i in range(levels))
    up = tuple(any(k.startswith(f"up_blocks.{i}.attentions.") for k in shapes) for i in range(levels))
    return UnetLayout(count(shapes, r"^down_blocks\.0\.resnets\.(\d+)\."), down, up)


def unet_config_from_ldm(shapes: Shapes, base: str, pooled_width: int | None, prediction_type: str) -> dict:
    """UNet2DConditionModel config for LDM UNet tensors (keys without `model.diffusion_model.`)."""
    conv_in = need(shapes, "input_blocks.0.0.weight", "UNet")
    layout = unet_layout_from_ldm(shapes)
    per_level = layout.layers_per_block + 1
    channels = [need(shapes, f"input_blocks.{per_level * i + 1}.0.out_layers.3.weight", "UNet")[0]
                for i in range(layout.levels)]

    def depth(block: str) -> int:
        return count(shapes, rf"^{re.escape(block)}\.transformer_blocks\.(\d+)\.")

    down_depth = [depth(f"input_blocks.{per_level * i + 1}.1") for i in range(layout.levels)]
    up_depth = [depth(f"output_blocks.{per_level * i}.1") for i in range(layout.levels)]
    mid_depth = depth("middle_block.1")
    if not mid_depth:
        raise BadFileError("the UNet has no middle-block transformer; only cross-attention UNets are converted")
    if layout.down_attention[-1] and down_depth[-1] != mid_depth:
        raise BadFileError("the deepest level and the middle block have different transformer depths")
    per_level_depth = [d if d else 1 for d in down_depth[:-1]] + [mid_depth]
    reverse = list(reversed(per_level_depth))
    up_needed = [d if attends else reverse[i] for i, (d, attends) in enumerate(zip(up_depth, layout.up_attention))]

    context = next((s[1] for k, s in sorted(shapes.items()) if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in sorted(shapes.items()) if k.endswith(".proj_in.weight")), None)
    if context is None or proj_in is None:
        raise BadFileError("the UNet has no cross-attention (attn2) weights")
    sd2_base = base == "sd2" and prediction_type == "epsilon"  # SD2-base is a 512 px model, SD2-v a 768 px one
    config: dict = {
        "sample_size": UNET_SAMPLE_SIZE["sd1"] if sd2_base else UNET_SAMPLE_SIZE[base],
        "in_channels": conv_in[1],
        "out_channels": need(shapes, "out.2.weight", "UNet")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "block_out_channels": channels,
        "layers_per_block": layout.layers_per_block,
        "cross_attention_dim": context,
        "use_linear_projection": len(proj_in) == 2,
        "attention_head_dim": _unet_heads(channels, base),
        "transformer_layers_per_block": per_level_depth if len(set(per_level_depth)) > 1 else per_level_depth[0],
        "norm_num_groups": NORM_GROUPS,
    }
    if up_needed != reverse:
        config["reverse_transformer_layers_per_block"] = up_needed
    time_width = need(shapes, "time_embed.0.weight", "UNet")[0]
    if time_width != 4 * channels[0]:
        config["time_embedding_dim"] = time_width
    if "label_emb.0.0.weight" in shapes:
        config.update(_text_time_config(shapes["label_emb.0.0.weight"][1], base, pooled_width))
    return config


def _text_time_config(width: int, base: str, pooled_width: int | None) -> dict:
    """SDXL's added conditioning: pooled text plus 6 size/crop ids, each a sinusoidal embedding."""
    if base != "sdxl" or not pooled_width:
        raise BadFileError("UNet label embedding without SDXL text encoders: class-conditional UNets are not supported")
    time_width, remainder = divmod(width - pooled_width, 6)
    if remainder or time_width <= 0:
        raise BadFileError(f"label embedding input {width} does not split into pooled text {pooled_width} + 6 time ids")
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_width,
        "projection_class_embeddings_input_dim": width,
    }
