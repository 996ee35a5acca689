"""A tiny Flux.1 pipeline folder from diffusers and transformers classes (the tiny CLIP tokenizer stands in
for T5's, which needs no network): what verify and sample load in tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

from adapterzoo.tiny_models import VOCAB_SIZE, tiny_text_encoder, tiny_tokenizer

T5_WIDTH = 32


def tiny_flux_transformer(guidance: bool = True, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                  pooled_projection_dim=768, guidance_embeds=guidance, axes_dims_rope=[4, 6, 6])


def tiny_flux_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
                         shift_factor=0.1159)


def tiny_t5() -> T5EncoderModel:
    torch.manual_seed(2)
    return T5EncoderModel(T5Config(vocab_size=VOCAB_SIZE, d_model=T5_WIDTH, d_ff=64, num_layers=1, num_heads=2,
                                   d_kv=16, feed_forward_proj="gated-gelu"))


def save_tiny_flux(folder: Path, guidance: bool = True, parts: tuple[str, ...] = ("transformer", "vae",
                   "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")) -> Path:
    """A diffusers FluxPipeline folder holding `parts` (dev with guidance, schnell without)."""
    classes = {"transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel"), "text_encoder_2": ("transformers", "T5EncoderModel"),
               "tokenizer": ("transformers", "CLIPTokenizer"), "tokenizer_2": ("transformers", "CLIPTokenizer"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}
    makers = {"transformer": lambda: tiny_flux_transformer(guidance), "vae": tiny_flux_vae,
              "text_encoder": lambda: (torch.manual_seed(3), tiny_text_encoder("sd1"))[1], "text_encoder_2": tiny_t5,
              "tokenizer": tiny_tokenizer, "tokenizer_2": tiny_tokenizer,
              "scheduler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=guidance)}
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.30.0"}
    for name in parts:
        makers[name]().save_pretrained(folder / name)
        index[name] = list(classes[name])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_lone_t5(encoder_folder: Path, path: Path) -> Path:
    """A T5 encoder folder as ComfyUI's t5xxl_fp16 file: T5EncoderModel's names, the embedding once (`shared`)."""
    state = T5EncoderModel.from_pretrained(encoder_folder).state_dict()
    save_file({k: v.contiguous() for k, v in state.items() if k != "encoder.embed_tokens.weight"}, str(path))
    return path


def save_lone_ae(vae_folder: Path, path: Path) -> Path:
    """A VAE folder as BFL's ae.safetensors: the original (LDM) names, attention weights as 1x1 convs."""
    from adapterzoo.formats.model.vae_names import diffusers_to_ldm_vae, is_attention_weight

    vae = AutoencoderKL.from_pretrained(vae_folder)
    levels = len(vae.config.block_out_channels)
    ae = {}
    for key, tensor in vae.state_dict().items():
        name = diffusers_to_ldm_vae(key, levels)
        ae[name] = tensor[:, :, None, None].contiguous() if is_attention_weight(name) else tensor.contiguous()
    save_file(ae, str(path))
    return path
