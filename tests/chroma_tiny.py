"""A tiny ChromaPipeline folder from diffusers and transformers classes: Flux.1's tiny VAE and T5, and a tokenizer
that follows T5's rules (EOS 1, pad 0), built in memory: what verify and sample load in the Chroma tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
from embedding_helpers import t5_tokenizer
from flux_tiny import T5_WIDTH, tiny_flux_vae, tiny_t5

T5_TOKENS = 32  # the tokenizer's model_max_length: what the loop pads T5's prompt to (ChromaPipeline: 512 at most)
CLASSES = {"transformer": ("diffusers", "ChromaTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
           "text_encoder": ("transformers", "T5EncoderModel"), "tokenizer": ("transformers", "T5TokenizerFast"),
           "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}


def tiny_chroma_transformer() -> ChromaTransformer2DModel:
    """2 heads × 16, one double and one single block, the approximator 32 wide on 16 channels, 2 layers."""
    torch.manual_seed(0)
    return ChromaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                    approximator_hidden_dim=32, approximator_layers=2)


def save_tiny_chroma(folder: Path, parts: tuple[str, ...] = tuple(CLASSES)) -> Path:
    """A diffusers ChromaPipeline folder holding `parts`; its scheduler shifts by the image's tokens (FLUX.1-dev's
    rule, what adapterzoo gives a single file)."""
    makers = {"transformer": tiny_chroma_transformer, "vae": tiny_flux_vae, "text_encoder": tiny_t5,
              "tokenizer": lambda: t5_tokenizer(T5_TOKENS),
              "scheduler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)}
    index = {"_class_name": "ChromaPipeline", "_diffusers_version": "0.42.0"}
    for name in parts:
        makers[name]().save_pretrained(folder / name)
        index[name] = list(CLASSES[name])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
