"""Reading a model's config from its tensor shapes: keys it must have, block counts, and the KL VAE's config
(FORMATS.md §2.4), which every family with an LDM-named autoencoder shares."""

from __future__ import annotations

import re

from adapterzoo.errors import BadFileError

Shapes = dict[str, tuple[int, ...]]

NORM_GROUPS = 32  # LDM's GroupNorm32 everywhere, so any LDM file has 32 groups
HEAD_WIDTH = 64  # SD2/SDXL (num_head_channels: 64) and every CLIP text encoder here
CLIP_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
CLIP_L_WIDTH = 768  # OpenAI's CLIP-L, the one CLIP tower in use with quick_gelu


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


def heads_for(width: int, head_width: int) -> int:
    """Heads of width `head_width` if they fit, else the fewest heads whose width divides `width` and is <= it."""
    if width % head_width == 0:
        return width // head_width
    return width // max(d for d in range(1, head_width + 1) if width % d == 0)


def clip_config_from_hf(shapes: Shapes, openclip: bool | None = None) -> dict:
    """CLIPTextConfig fields for HF-named text-encoder tensors (keys without `text_model.`); `openclip` None:
    from the width (OpenAI's CLIP-L is 768 wide, the OpenCLIP towers are wider)."""
    if openclip is None:
        openclip = need(shapes, "embeddings.token_embedding.weight", "text encoder")[1] != CLIP_L_WIDTH
    vocab, width = need(shapes, "embeddings.token_embedding.weight", "text encoder")
    config = {
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": need(shapes, "encoder.layers.0.mlp.fc1.weight", "text encoder")[0],
        "num_hidden_layers": count(shapes, r"^encoder\.layers\.(\d+)\."),
        "num_attention_heads": heads_for(width, HEAD_WIDTH),
        "max_position_embeddings": need(shapes, "embeddings.position_embedding.weight", "text encoder")[0],
        # OpenAI's CLIP-L uses quick_gelu; the OpenCLIP towers of SD2 and SDXL use exact gelu.
        "hidden_act": "gelu" if openclip else "quick_gelu",
        "layer_norm_eps": 1e-5,
        **CLIP_TOKEN_IDS,
    }
    if "text_projection.weight" in shapes:
        config["projection_dim"] = shapes["text_projection.weight"][0]
    return config
