"""A tiny Z-Image pipeline from diffusers and transformers classes: a ZImageTransformer2DModel, Flux.1's kind of
VAE, a Qwen3 text encoder and a byte-level Qwen2 tokenizer whose vocabulary and chat template are written here (no
network): what verify and sample load in tests, as a diffusers folder and as ComfyUI's single file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
from safetensors.torch import save_file
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

CAP = 32  # Qwen3's width = the transformer's cap_feat_dim (2560 in the real model)
DIM = 32  # 2 heads of 16
CHANNELS = 16
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template for what ZImagePipeline asks (one user turn, the assistant's opened, thinking on)
CHAT_TEMPLATE = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
                 "{%- endif %}{%- endif %}")
CLASSES = {"transformer": ("diffusers", "ZImageTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
           "text_encoder": ("transformers", "Qwen3Model"), "tokenizer": ("transformers", "Qwen2Tokenizer"),
           "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level characters (Qwen2's BPE), one per byte value."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def tiny_tokenizer() -> Qwen2Tokenizer:
    """Every byte a token, no merges, Qwen3's specials and chat template."""
    alphabet = byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)} | {s: len(alphabet) + i for i, s in enumerate(SPECIALS)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3() -> Qwen3Model:
    """Narrow and shallow, with Qwen3-4B's rope base, norm epsilon and length (which no weight's shape says)."""
    torch.manual_seed(2)
    return Qwen3Model(Qwen3Config(vocab_size=len(byte_alphabet()) + len(SPECIALS), hidden_size=CAP,
                                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                  max_position_embeddings=40960)).eval()


def save_qwen3_file(path: Path, encoder: Qwen3Model) -> Path:
    """The text encoder as ComfyUI's lone file holds it: Qwen3ForCausalLM's names (`model.`), the LM head beside."""
    tensors = {"model." + k: v.contiguous() for k, v in encoder.state_dict().items()}
    save_file({**tensors, "lm_head.weight": encoder.embed_tokens.weight.detach().clone()}, str(path))
    return path


def tiny_transformer() -> ZImageTransformer2DModel:
    torch.manual_seed(0)
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=CHANNELS, dim=DIM,
                                    n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=CAP,
                                    axes_dims=[4, 6, 6], axes_lens=[1024, 32, 32]).eval()


def tiny_vae() -> AutoencoderKL:
    """Factor 2, 16 latent channels, Flux.1's scaling and shift factors (Z-Image's VAE is Flux.1's)."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                         latent_channels=CHANNELS, norm_num_groups=32, sample_size=32, scaling_factor=0.3611,
                         shift_factor=0.1159)


def save_tiny_zimage(folder: Path, parts: tuple[str, ...] = tuple(CLASSES)) -> Path:
    """A diffusers ZImagePipeline folder holding `parts`."""
    makers = {"transformer": tiny_transformer, "vae": tiny_vae, "text_encoder": tiny_qwen3,
              "tokenizer": tiny_tokenizer, "scheduler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}
    index = {"_class_name": "ZImagePipeline", "_diffusers_version": "0.36.0"}
    for name in parts:
        makers[name]().save_pretrained(folder / name)
        index[name] = list(CLASSES[name])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's state dict in ComfyUI's names (comfy's z_image_to_diffusers read backwards): q, k, v fused
    into attention.qkv, a few renames, and the `norm_final` ComfyUI's files carry unused."""
    renames = {"all_x_embedder.2-1.": "x_embedder.", "all_final_layer.2-1.": "final_layer.",
               ".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
               ".attention.norm_k.": ".attention.k_norm."}
    out = {}
    for key, value in sd.items():
        if ".attention.to_" in key and ".to_out" not in key:
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    for key in sd:
        if key.endswith(".attention.to_q.weight"):
            block = key.removesuffix(".to_q.weight")
            out[f"{block}.qkv.weight"] = torch.cat([sd[f"{block}.to_{x}.weight"] for x in "qkv"])
    out["norm_final.weight"] = torch.ones(sd["cap_embedder.1.weight"].shape[0])
    return out


def save_comfy_file(path: Path, transformer: ZImageTransformer2DModel) -> Path:
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in to_comfy(transformer.state_dict()).items()},
              str(path))
    return path
