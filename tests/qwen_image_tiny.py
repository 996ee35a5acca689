"""A tiny Qwen-Image pipeline from diffusers and transformers classes: a QwenImageTransformer2DModel, Qwen-Image's
kind of VAE (factor 2), a Qwen2.5-VL text encoder (a tiny vision tower beside it, as the real one has) and Z-Image's
byte-level Qwen2 tokenizer (no network): what verify and sample load in tests, as a diffusers folder and as
ComfyUI's single file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from zimage_tiny import SPECIALS, byte_alphabet, tiny_tokenizer

from adapterzoo.formats.families.qwen_image.sampling import SCHEDULER

TEXT = 32  # Qwen2.5-VL's width = the transformer's joint_attention_dim (3584 in the real model)
CHANNELS = 16
CLASSES = {"transformer": ("diffusers", "QwenImageTransformer2DModel"),
           "vae": ("diffusers", "AutoencoderKLQwenImage"),
           "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
           "tokenizer": ("transformers", "Qwen2Tokenizer"),
           "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}


def tiny_qwen25vl() -> Qwen2_5_VLForConditionalGeneration:
    """Narrow and shallow, with Qwen2.5-VL-7B's rope base, norm epsilon and mrope split in proportion."""
    torch.manual_seed(2)
    vocab = len(byte_alphabet()) + len(SPECIALS)
    text = {"vocab_size": vocab, "hidden_size": TEXT, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 2048, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "bos_token_id": vocab - 5, "eos_token_id": vocab - 3}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": TEXT,
              "fullatt_block_indexes": [0]}
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()


def tiny_transformer() -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=CHANNELS * 4, out_channels=CHANNELS, num_layers=2,
                                       attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT,
                                       axes_dims_rope=(4, 14, 14)).eval()


def tiny_vae() -> AutoencoderKLQwenImage:
    """Factor 2 (one downsampling), 16 latent channels, Qwen-Image's per-channel latent mean and std."""
    torch.manual_seed(1)
    return AutoencoderKLQwenImage(base_dim=16, z_dim=CHANNELS, dim_mult=[1, 2], num_res_blocks=1,
                                  temperal_downsample=[False]).eval()


def save_tiny_qwen_image(folder: Path, parts: tuple[str, ...] = tuple(CLASSES)) -> Path:
    """A diffusers QwenImagePipeline folder holding `parts`, Qwen/Qwen-Image's scheduler config in it."""
    makers = {"transformer": tiny_transformer, "vae": tiny_vae, "text_encoder": tiny_qwen25vl,
              "tokenizer": tiny_tokenizer, "scheduler": lambda: FlowMatchEulerDiscreteScheduler(**SCHEDULER)}
    index = {"_class_name": "QwenImagePipeline", "_diffusers_version": "0.35.0"}
    for name in parts:
        makers[name]().save_pretrained(folder / name)
        index[name] = list(CLASSES[name])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_comfy_file(path: Path, transformer: QwenImageTransformer2DModel) -> Path:
    """ComfyUI's diffusion_models file: diffusers' own names under `model.diffusion_model.`."""
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in transformer.state_dict().items()}, str(path))
    return path
