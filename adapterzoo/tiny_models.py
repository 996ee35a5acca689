"""Tiny, structurally faithful SD1/SD2/SDXL components with random weights, for the demo and tests.

Widths are small so everything runs on a CPU in seconds, but the parts that tools read to tell the
bases apart are real: the UNet's cross-attention width (768 / 1024 / 2048), the text encoders'
hidden sizes (768 / 1024 / 768+1280), linear vs conv `proj_in`, SDXL's "text_time" embedding and
layers_per_block 2 (so the LDM block arithmetic of FORMATS.md §2.1 holds).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

BASES = ("sd1", "sd2", "sdxl")
CONTEXT_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
MAX_TOKENS = 77
VOCAB_SIZE = 1000  # text-encoder embedding rows; the tiny tokenizer uses fewer ids than this
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Prompt words the tiny tokenizer knows whole; anything else falls back to byte-level pieces.
_WORDS = ["a", "an", "the", "of", "in", "on", "at", "with", "and", "photo", "picture", "painting", "drawing", "portrait", "landscape", "close", "up", "cat", "dog", "bird", "horse", "fish", "cow", "sheep", "fox", "wolf", "lion", "tiger", "bear", "rabbit", "mouse", "duck", "owl", "frog", "red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "gray", "golden", "silver", "house", "tree", "forest", "mountain", "river", "lake", "sea", "ocean", "beach", "city", "street", "road", "bridge", "castle", "garden", "sky", "cloud", "sun", "moon", "star", "night", "day", "morning", "evening", "snow", "rain", "fog", "storm", "light", "shadow", "man", "woman", "girl", "boy", "child", "old", "young", "smiling", "sitting", "standing", "running", "flying", "sleeping", "detailed", "realistic", "cinematic", "lighting", "sharp", "focus", "high", "quality", "masterpiece", "style", "art", "oil", "watercolor", "sketch", "anime", "digital", "render", "studio", "soft", "warm", "cold", "bright", "dark"]

_SCHEDULER_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _check_base(base: str) -> None:
    if base not in BASES:
        raise ValueError(f"base must be one of {', '.join(BASES)}, not {base!r}")


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character per byte value, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in printable] + [chars[b] for b in range(256) if b not in printable]


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE: the 512 byte symbols, a few hundred word pieces, then the two specials."""
    alphabet = _bytes_to_unicode()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    known = set(tokens)
    for word in sorted(_WORDS, key=len, reverse=True):  # long words first keep them whole
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        piece = symbols[0]
        for symbol in symbols[1:]:
            merged = piece + symbol
            if merged not in known:
                merges.append((piece, symbol))
                tokens.append(merged)
                known.add(merged)
            piece = merged
    tokens += [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def _write_bpe_files(folder: Path) -> None:
    """vocab.json + merges.txt: what every CLIPTokenizer (slow or fast, any transformers) can read."""
    vocab, merges = tiny_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json + merges.txt + tokenizer_config.json that `CLIPTokenizer.from_pretrained` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_bpe_files(folder)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def tiny_tokenizer() -> CLIPTokenizer:
    """The same tokenizer in memory, with CLIP's 77-token limit."""
    vocab, merges = tiny_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def tiny_unet(base: str) -> UNet2DConditionModel:
    """Two-level UNet (32, 64 channels) with the real context width and projection style of `base`."""
    _check_base(base)
    common = {
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (32, 64),
        "norm_num_groups": 32,
        "cross_attention_dim": CONTEXT_WIDTH[base],
    }
    if base == "sd1":
        return UNet2DConditionModel(
            sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2,
            use_linear_projection=False,
            **common,
        )
    if base == "sd2":
        return UNet2DConditionModel(
            sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            **common,
        )
    # SDXL: resnet-only first level, deeper transformers below, pooled text + 6 size/crop ids.
    time_dim = 256
    pooled_dim = 1280
    return UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
        **common,
    )


def _clip_config(hidden: int, heads: int, act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    vocab, _ = tiny_vocab_and_merges()
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=act,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        **extra,
    )


def tiny_text_encoder(base: str, index: int = 1) -> CLIPTextModel | CLIPTextModelWithProjection:
    """One-layer CLIP at the real hidden width: CLIP-L 768, OpenCLIP-H 1024, SDXL's second (bigG) 1280."""
    _check_base(base)
    if index == 2:
        if base != "sdxl":
            raise ValueError("only sdxl has a second text encoder")
        return CLIPTextModelWithProjection(_clip_config(1280, 20, "gelu", projection_dim=1280))
    if index != 1:
        raise ValueError("index must be 1 or 2")
    if base == "sd2":
        return CLIPTextModel(_clip_config(1024, 16, "gelu"))
    return CLIPTextModel(_clip_config(768, 12, "quick_gelu"))


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    """Four-level KL autoencoder (factor 8, 4 latent channels) like every SD1/SD2/SDXL VAE."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def tiny_scheduler(base: str) -> PNDMScheduler | EulerDiscreteScheduler:
    """The scheduler each base ships with, with SD's beta schedule."""
    _check_base(base)
    if base == "sdxl":
        return EulerDiscreteScheduler(steps_offset=1, timestep_spacing="leading", **_SCHEDULER_BETAS)
    return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **_SCHEDULER_BETAS)


def tiny_pipeline(base: str, seed: int = 0) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A whole pipeline in memory; the same seed gives the same weights."""
    _check_base(base)
    torch.manual_seed(seed)
    unet = tiny_unet(base)
    vae = tiny_vae(0.13025 if base == "sdxl" else 0.18215)
    text_encoder = tiny_text_encoder(base)
    if base == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=tiny_text_encoder(base, 2),
            tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(),
            unet=unet,
            scheduler=tiny_scheduler(base),
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=tiny_scheduler(base),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(base: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a diffusers folder that `from_pretrained` loads offline (safetensors weights)."""
    folder = Path(folder)
    tiny_pipeline(base, seed).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):
        if (folder / name).is_dir():
            _write_bpe_files(folder / name)  # transformers 5 writes only tokenizer.json; 4.x needs these
    return folder
