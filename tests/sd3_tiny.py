"""A tiny SD3.5 pipeline from diffusers and transformers classes, as a diffusers folder and as an SAI single file
of the same transformer (the tiny CLIP tokenizer stands in for T5's, which needs no network): what verify and
sample load in tests.

The SAI tensors are the source: diffusers' own single-file converter makes the folder's transformer of them, so
the file and the folder hold the same model. The transformer is SD3.5 Medium-shaped (q/k norms, MMDiT-X's attn2
in block 0); CLIP-L and CLIP-G are narrower than T5, so their states are padded to its width as in the real
model (768 + 1280 -> 4096). CLIP-L is the narrower of the two, as in the real model, and each CLIP has the heads a
lone file's config reads from its width (64-wide heads, else one), so that its tensors saved alone load back as the
same model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

from adapterzoo.tiny_models import BOS, EOS, MAX_TOKENS, VOCAB_SIZE, tiny_tokenizer, tiny_vocab_and_merges

LDM = "model.diffusion_model."
CHANNELS = 16  # SD3's VAE latents
T5_WIDTH = 32  # joint_attention_dim: the token states' width
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
CLIP_WIDTHS = (8, 16)  # CLIP-L, CLIP-G hidden sizes (768 < 1280 in the real model): 24, padded to T5_WIDTH
PROJECTION = 12  # each CLIP's text projection: pooled = 24
TINY = {"sample_size": 8, "patch_size": 2, "in_channels": CHANNELS, "out_channels": CHANNELS, "num_layers": 3,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": T5_WIDTH,
        "caption_projection_dim": 16, "pooled_projection_dim": 2 * PROJECTION, "pos_embed_max_size": 8,
        "qk_norm": "rms_norm", "dual_attention_layers": [0]}
WIDTH = TINY["attention_head_dim"] * TINY["num_attention_heads"]
CLASSES = {"transformer": ("diffusers", "SD3Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
           "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
           "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
           "text_encoder_3": ("transformers", "T5EncoderModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
           "tokenizer_2": ("transformers", "CLIPTokenizer"), "tokenizer_3": ("transformers", "CLIPTokenizer"),
           "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}
WITHOUT_T5 = tuple(name for name in CLASSES if not name.endswith("_3"))


def sai_shapes(width: int, depth: int, qk: bool, dual: list[int], pos: int, head: int = 64, joint: int = 4096,
               pooled: int = 2048, channels: int = 16) -> dict[str, tuple[int, ...]]:
    """Every tensor of an SAI MMDiT (sd3_impls' names): joint blocks of an x and a context stream, the last
    context block "pre only" (qkv and a 2-way modulation), MMDiT-X's attn2 in the `dual` blocks."""
    w = width
    shapes = {"pos_embed": (1, pos * pos, w), "x_embedder.proj.weight": (w, channels, 2, 2),
              "x_embedder.proj.bias": (w,),
              "context_embedder.weight": (w, joint), "context_embedder.bias": (w,),
              "final_layer.linear.weight": (4 * channels, w), "final_layer.linear.bias": (4 * channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * w, w), "final_layer.adaLN_modulation.1.bias": (2 * w,)}
    for embedder, width_in in (("t_embedder", 256), ("y_embedder", pooled)):
        shapes |= {f"{embedder}.mlp.0.weight": (w, width_in), f"{embedder}.mlp.0.bias": (w,),
                   f"{embedder}.mlp.2.weight": (w, w), f"{embedder}.mlp.2.bias": (w,)}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    for i in range(depth):
        for stream in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{stream}"
            pre_only = stream == "context_block" and i == depth - 1
            attentions = ["attn", "attn2"] if stream == "x_block" and i in dual else ["attn"]
            for attn in attentions:
                linear(f"{p}.{attn}.qkv", 3 * w, w)
                if not pre_only:
                    linear(f"{p}.{attn}.proj", w, w)
                if qk:
                    shapes[f"{p}.{attn}.ln_q.weight"] = shapes[f"{p}.{attn}.ln_k.weight"] = (head,)
            linear(f"{p}.adaLN_modulation.1", (2 if pre_only else 9 if len(attentions) == 2 else 6) * w, w)
            if not pre_only:
                linear(f"{p}.mlp.fc1", 4 * w, w)
                linear(f"{p}.mlp.fc2", w, 4 * w)
    return shapes


def tiny_sai_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny transformer in SAI names (no prefix), random."""
    shapes = sai_shapes(WIDTH, TINY["num_layers"], True, TINY["dual_attention_layers"], TINY["pos_embed_max_size"],
                        head=TINY["attention_head_dim"], joint=T5_WIDTH, pooled=2 * PROJECTION, channels=CHANNELS)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}


def tiny_sd3_transformer(sai: dict[str, torch.Tensor]) -> SD3Transformer2DModel:
    """What diffusers' single-file converter makes of the SAI tensors (it pops what it reads: a copy)."""
    model = SD3Transformer2DModel(**TINY).eval()
    model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(sai)), strict=True)
    return model


def tiny_clip(width: int, seed: int) -> CLIPTextModelWithProjection:
    vocab, _ = tiny_vocab_and_merges()
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=1, max_position_embeddings=MAX_TOKENS, hidden_act="gelu", projection_dim=PROJECTION,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))


def tiny_t5() -> T5EncoderModel:
    torch.manual_seed(4)
    return T5EncoderModel(T5Config(vocab_size=VOCAB_SIZE, d_model=T5_WIDTH, d_ff=64, num_layers=1, num_heads=2,
                                   d_kv=16, feed_forward_proj="gated-gelu"))


def tiny_t5_tokenizer() -> CLIPTokenizer:
    """The tiny CLIP tokenizer with T5's room: StableDiffusion3Pipeline pads T5's prompt to 256 tokens."""
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = T5_TOKENS
    return tokenizer


def tiny_sd3_vae() -> AutoencoderKL:
    """Factor 2, 16 latent channels, SD3's scaling and shift factors."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                         latent_channels=CHANNELS, norm_num_groups=32, sample_size=32, scaling_factor=1.5305,
                         shift_factor=0.0609)


def save_tiny_sd3(folder: Path, sai: dict[str, torch.Tensor] | None = None,
                  parts: tuple[str, ...] = tuple(CLASSES)) -> Path:
    """A diffusers StableDiffusion3Pipeline folder holding `parts` (T5 included unless left out)."""
    sai = tiny_sai_tensors() if sai is None else sai
    makers = {"transformer": lambda: tiny_sd3_transformer(sai), "vae": tiny_sd3_vae,
              "text_encoder": lambda: tiny_clip(CLIP_WIDTHS[0], 2),
              "text_encoder_2": lambda: tiny_clip(CLIP_WIDTHS[1], 3),
              "text_encoder_3": tiny_t5, "tokenizer": tiny_tokenizer, "tokenizer_2": tiny_tokenizer,
              "tokenizer_3": tiny_t5_tokenizer, "scheduler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)}
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.35.0"}
    for name in CLASSES:
        if name in parts:
            makers[name]().save_pretrained(folder / name)
            index[name] = list(CLASSES[name])
        else:
            index[name] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_sai_file(path: Path, sai: dict[str, torch.Tensor], prefix: str = LDM) -> Path:
    """The transformer as an SAI single file (ComfyUI's `model.diffusion_model.` names by default)."""
    save_file({prefix + k: v.contiguous() for k, v in sai.items()}, str(path))
    return path
