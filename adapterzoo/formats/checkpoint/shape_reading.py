"""Reading a model's config from its tensor shapes: keys it must have, block counts, and the KL VAE's config
(FORMATS.md §2.4), which every family with an LDM-named autoencoder shares."""

from __future__ import annotations

import re

from adapterzoo.errors import BadFileError

Shapes = dict[str, tuple[int, ...]]

NORM_GROUPS = 32  # LDM's GroupNorm32 everywhere, so any LDM file has 32 groups


def need(shapes: Shapes, key: str, part: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BadFileError(f"the {part} has no {key}; cannot infer its configuration")
    return shapes[key]


def indices(shapes: Shapes, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m[1]) for k in shapes if (m := regex.match(k))})


def count(shapes: Shapes, pattern: str) -> int:
    found = indices(shapes, pattern)
    return found[-1] + 1 if found else 0


def vae_config_from_ldm(shapes: Shapes, sample_size: int, scaling_factor: float) -> dict:
    """AutoencoderKL config for LDM VAE tensors (keys without `first_stage_model.`); the image size it was
    trained at and its latent scaling are in no weight, so the caller says them."""
    conv_in = need(shapes, "encoder.conv_in.weight", "VAE")
    levels = count(shapes, r"^encoder\.down\.(\d+)\.")
    if not levels:
        raise BadFileError("the VAE has no encoder.down blocks")
    latent = need(shapes, "decoder.conv_in.weight", "VAE")[1]
    return {
        "in_channels": conv_in[1],
        "out_channels": need(shapes, "decoder.conv_out.weight", "VAE")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [need(shapes, f"encoder.down.{i}.block.0.conv2.weight", "VAE")[0]
                               for i in range(levels)],
        "layers_per_block": count(shapes, r"^encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": latent,
        "norm_num_groups": NORM_GROUPS,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }
