"""Build one test file (or folder) for every kind/base/format row `probe` must recognise.

Each builder writes into its own folder under `root` and returns a `Case`: the path plus what a
correct probe must answer, computed here from what was written (never from adapterzoo itself).

Where a real tool writes the format, the real tool writes it: peft injects LoRA layers into tiny
diffusers/transformers models and diffusers' own savers and converters serialise them. Formats
whose writers are not installed (kohya sd-scripts, LyCORIS, A1111) are written key by key from
FORMATS.md, at real SD1/SD2/SDXL widths: the module paths come from real-size models instantiated
on the `meta` device from their published config dicts, so every name and shape is the real one.

Checkpoints have the full real key set and shapes but are written as *sparse* safetensors files
(the header, then a hole): gigabytes in apparent size, a few hundred KB on disk, all-zero data.
Anything that reads tensor data from them reads zeros; hashing one reads its full apparent size.
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import math
import os
import pickle
import re
import struct
import subprocess
import tarfile
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

# ----------------------------------------------------------------------------------------------
# What a case promises


@dataclass
class Case:
    """A file (or folder) and the probe answer it must get; only the fields named are checked."""

    path: Path
    expect: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Hostile:
    """A pickle whose payload would create `marker` if it were ever unpickled normally."""

    path: Path
    marker: Path


CASES: dict[str, Callable[[Path], Case]] = {}
BAD: dict[str, Callable[[Path], Path]] = {}


def case(name: str) -> Callable:
    def register(builder: Callable[[Path], Case]) -> Callable[[Path], Case]:
        CASES[name] = builder
        return builder

    return register


def bad(name: str) -> Callable:
    def register(builder: Callable[[Path], Path]) -> Callable[[Path], Path]:
        BAD[name] = builder
        return builder

    return register


def build(name: str, root: Path) -> Case:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=False)
    return CASES[name](folder)


# ----------------------------------------------------------------------------------------------
# Writing safetensors: real ones, and sparse ones whose data section is a hole

DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8}

Specs = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def write_sparse_safetensors(path: Path, specs: Specs, metadata: dict[str, str] | None = None) -> Path:
    """A valid safetensors file whose data section is all zeros, stored as a hole."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in specs.items():
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return path


def write_header_only(path: Path, header: dict[str, Any], data_bytes: int, header_len: int | None = None) -> Path:
    """Write an arbitrary (possibly lying) header followed by `data_bytes` zero bytes."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw) if header_len is None else header_len))
        fh.write(raw)
        fh.write(b"\0" * data_bytes)
    return path


def randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Real architectures on the meta device (names and shapes only, no weights)

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
}
SD21_UNET = {**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
             "use_linear_projection": True}
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
UNET_CONFIGS = {"sd1": SD15_UNET, "sd2": SD21_UNET, "sdxl": SDXL_UNET}

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu"}
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
              "hidden_act": "gelu"}  # SD2's text encoder as diffusers/kohya hold it: 23 of 24 layers
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "hidden_act": "gelu", "projection_dim": 1280}
SD_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
          "layers_per_block": 2, "latent_channels": 4}


@functools.lru_cache(maxsize=None)
def meta_unet(base: str, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**{**UNET_CONFIGS[base], "in_channels": in_channels})


@functools.lru_cache(maxsize=None)
def meta_clip(which: str):
    """which: clip_l | openclip_h | bigg (HF CLIPTextModel(WithProjection) layout)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = {"clip_l": CLIP_L, "openclip_h": OPENCLIP_H, "bigg": OPENCLIP_BIGG}[which]
    cls = CLIPTextModelWithProjection if which == "bigg" else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))


@functools.lru_cache(maxsize=None)
def meta_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**{**SD_VAE, "latent_channels": latent_channels})


def layer_shapes(model: torch.nn.Module, pattern: str) -> dict[str, tuple[int, ...]]:
    """Weight shapes of the Linear/Conv2d modules whose path matches `pattern`."""
    rx = re.compile(pattern)
    return {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and rx.search(name)
    }


def hf_text_path(path: str) -> str:
    """kohya and checkpoints say `text_model.`; transformers 5 module paths lack it."""
    return path if path.startswith("text_model.") else "text_model." + path


KOHYA_UNET_TARGETS = (r"attentions\.\d+\.(proj_in|proj_out|"
                      r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$")
KOHYA_CONV_TARGETS = r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$"
KOHYA_TE_TARGETS = r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$"

# ----------------------------------------------------------------------------------------------
# diffusers -> LDM names (FORMATS.md §2.1, §2.4), written out here independently of adapterzoo

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def ldm_unet_path(path: str, config: dict) -> str:
    """Map a diffusers UNet module/parameter path to its LDM (`input_blocks...`) spelling."""
    for old, new in _UNET_TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    n = config["layers_per_block"] + 1
    parts = path.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([_RESNET_LDM[rest[0]], *rest[1:]])

    if parts[0] == "mid_block":
        slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
        rest = parts[3:]
        return f"middle_block.{slot}." + (resnet(rest) if parts[1] == "resnets" else ".".join(rest))
    i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{n * (i + 1)}.0.op." + ".".join(rest[1:])
        block = f"input_blocks.{n * i + j + 1}"
    else:
        if kind == "upsamplers":
            has_attention = config["up_block_types"][i].startswith("CrossAttn")
            return f"output_blocks.{n * i + n - 1}.{2 if has_attention else 1}.conv." + ".".join(rest[1:])
        block = f"output_blocks.{n * i + j}"
    return f"{block}.0.{resnet(rest)}" if kind == "resnets" else f"{block}.1.{'.'.join(rest)}"


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_path(path: str) -> str:
    path = path.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    path = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", path)
    for old, new in _VAE_ATTN.items():
        path = path.replace(f"mid_block.attentions.0.{old}.", f"mid.attn_1.{new}.")
    path = re.sub(r"encoder\.down_blocks\.(\d)\.resnets", r"encoder.down.\1.block", path)
    path = re.sub(r"encoder\.down_blocks\.(\d)\.downsamplers\.0", r"encoder.down.\1.downsample", path)
    path = re.sub(r"decoder\.up_blocks\.(\d)\.resnets", lambda m: f"decoder.up.{3 - int(m[1])}.block", path)
    path = re.sub(r"decoder\.up_blocks\.(\d)\.upsamplers\.0", lambda m: f"decoder.up.{3 - int(m[1])}.upsample", path)
    return path


def unet_ldm_specs(base: str, dtype: str, in_channels: int = 4) -> Specs:
    config = UNET_CONFIGS[base]
    return {ldm_unet_path(name, config): (dtype, tuple(p.shape))
            for name, p in meta_unet(base, in_channels).named_parameters()}


def vae_ldm_specs(dtype: str, latent_channels: int = 4) -> Specs:
    specs = {}
    for name, p in meta_vae(latent_channels).named_parameters():
        shape = tuple(p.shape)
        if "mid_block.attentions.0.to_" in name and name.endswith("weight"):
            shape = (*shape, 1, 1)  # LDM attention projections are 1x1 convs
        specs[ldm_vae_path(name)] = (dtype, shape)
    return specs


def clip_hf_specs(which: str, dtype: str) -> Specs:
    specs = {hf_text_path(n): (dtype, tuple(p.shape)) for n, p in meta_clip(which).named_parameters()}
    specs["text_model.embeddings.position_ids"] = ("I64", (1, 77))
    return specs


def openclip_specs(width: int, layers: int, mlp: int, dtype: str) -> Specs:
    """OpenCLIP text tower keys as SD2/SDXL checkpoints store them (fused in_proj)."""
    specs: Specs = {"token_embedding.weight": (dtype, (49408, width)), "positional_embedding": (dtype, (77, width))}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        specs.update({
            p + "ln_1.weight": (dtype, (width,)), p + "ln_1.bias": (dtype, (width,)),
            p + "attn.in_proj_weight": (dtype, (3 * width, width)), p + "attn.in_proj_bias": (dtype, (3 * width,)),
            p + "attn.out_proj.weight": (dtype, (width, width)), p + "attn.out_proj.bias": (dtype, (width,)),
            p + "ln_2.weight": (dtype, (width,)), p + "ln_2.bias": (dtype, (width,)),
            p + "mlp.c_fc.weight": (dtype, (mlp, width)), p + "mlp.c_fc.bias": (dtype, (mlp,)),
            p + "mlp.c_proj.weight": (dtype, (width, mlp)), p + "mlp.c_proj.bias": (dtype, (width,)),
        })
    specs.update({"ln_final.weight": (dtype, (width,)), "ln_final.bias": (dtype, (width,)),
                  "text_projection": (dtype, (width, width)), "logit_scale": (dtype, ())})
    return specs


def prefixed(prefix: str, specs: Specs) -> Specs:
    return {prefix + k: v for k, v in specs.items()}


def sd_checkpoint_specs(base: str, dtype: str = "F16", in_channels: int = 4) -> Specs:
    """Every key of a pruned single-file SD1/SD2/SDXL checkpoint, with real shapes."""
    specs = prefixed("model.diffusion_model.", unet_ldm_specs(base, dtype, in_channels))
    specs |= prefixed("first_stage_model.", vae_ldm_specs(dtype))
    if base == "sd1":
        specs |= prefixed("cond_stage_model.transformer.", clip_hf_specs("clip_l", dtype))
    elif base == "sd2":
        specs |= prefixed("cond_stage_model.model.", openclip_specs(1024, 24, 4096, dtype))
    else:
        specs |= prefixed("conditioner.embedders.0.transformer.", clip_hf_specs("clip_l", dtype))
        specs |= prefixed("conditioner.embedders.1.model.", openclip_specs(1280, 32, 5120, dtype))
    specs["alphas_cumprod"] = ("F32", (1000,))
    return specs


# ----------------------------------------------------------------------------------------------
# kohya-style LoRA tensors at real widths


def lora_pair(shape: tuple[int, ...], rank: int, dtype: torch.dtype, gen: torch.Generator,
              conv_down_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a target weight of `shape`: linear, 1x1 conv, or kxk conv (LoCon)."""
    if len(shape) == 2:
        return randn((rank, shape[1]), dtype, gen), randn((shape[0], rank), dtype, gen)
    out_ch, in_ch, kh, kw = shape
    kernel = (kh, kw) if conv_down_kernel else (1, 1)
    return randn((rank, in_ch, *kernel), dtype, gen), randn((out_ch, rank, 1, 1), dtype, gen)


def flat(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def kohya_lora(targets: dict[str, tuple[int, ...]], rank: int, alpha: float, dtype: torch.dtype,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """targets: kohya module name -> target weight shape."""
    gen = _gen(seed)
    sd = {}
    for name, shape in targets.items():
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = lora_pair(shape, rank, dtype, gen)
        sd[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype)
    return sd


def te_targets(which: str, prefix: str) -> dict[str, tuple[int, ...]]:
    return {flat(prefix, hf_text_path(p)): s for p, s in layer_shapes(meta_clip(which), KOHYA_TE_TARGETS).items()}


def unet_targets(base: str, ldm: bool, pattern: str = KOHYA_UNET_TARGETS) -> dict[str, tuple[int, ...]]:
    shapes = layer_shapes(meta_unet(base), pattern)
    config = UNET_CONFIGS[base]
    return {flat("lora_unet", ldm_unet_path(p, config) if ldm else p): s for p, s in shapes.items()}


def kohya_metadata(base_version: str, dim: int, alpha: float, module: str = "networks.lora",
                   args: dict | None = None) -> dict[str, str]:
    meta = {"ss_network_module": module, "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_base_model_version": base_version, "ss_v2": str(base_version.startswith("sd_v2")),
            "ss_output_name": "test_lora"}
    if args is not None:
        meta["ss_network_args"] = json.dumps(args)
    return meta


def save_lora(folder: Path, name: str, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = folder / name
    save_file(sd, str(path), metadata=metadata)
    return path


def lora_case(path: Path, sd: dict[str, torch.Tensor], base: str, fmt: str, rank: int | None,
              alpha: float | None, dtype: str, kind: str = "lora", **details: Any) -> Case:
    expect = {"kind": kind, "base": base, "format": fmt, "rank": rank, "alpha": alpha, "dtype": dtype,
              "tensors": len(sd)}
    return Case(path, expect, details)


@case("kohya-sd1")
def kohya_sd1(folder: Path) -> Case:
    targets = te_targets("clip_l", "lora_te") | unet_targets("sd1", ldm=False)
    sd = kohya_lora(targets, rank=4, alpha=1.0, dtype=torch.float16)
    path = save_lora(folder, "kohya_sd1.safetensors", sd, kohya_metadata("sd_v1", 4, 1.0))
    return lora_case(path, sd, "sd1", "kohya", 4, 1.0, "fp16")


@case("kohya-sd1-no-metadata")
def kohya_sd1_bare(folder: Path) -> Case:
    """Shapes alone must say SD1: no ss_* hints at all."""
    sd = kohya_lora(unet_targets("sd1", ldm=False), rank=8, alpha=4.0, dtype=torch.float16)
    path = save_lora(folder, "bare.safetensors", sd)
    return lora_case(path, sd, "sd1", "kohya", 8, 4.0, "fp16")


@case("kohya-sd1-ldm")
def kohya_sd1_ldm(folder: Path) -> Case:
    targets = te_targets("clip_l", "lora_te") | unet_targets("sd1", ldm=True)
    sd = kohya_lora(targets, rank=2, alpha=1.0, dtype=torch.float16)
    path = save_lora(folder, "kohya_sd1_ldm.safetensors", sd, kohya_metadata("sd_v1", 2, 1.0))
    return lora_case(path, sd, "sd1", "kohya-ldm", 2, 1.0, "fp16")


@case("kohya-sd2")
def kohya_sd2(folder: Path) -> Case:
    targets = te_targets("openclip_h", "lora_te") | unet_targets("sd2", ldm=False)
    sd = kohya_lora(targets, rank=4, alpha=2.0, dtype=torch.float16)
    path = save_lora(folder, "kohya_sd2.safetensors", sd, kohya_metadata("sd_v2", 4, 2.0))
    return lora_case(path, sd, "sd2", "kohya", 4, 2.0, "fp16")


@case("kohya-sd2-ldm")
def kohya_sd2_ldm(folder: Path) -> Case:
    targets = te_targets("openclip_h", "lora_te") | unet_targets("sd2", ldm=True)
    sd = kohya_lora(targets, rank=2, alpha=1.0, dtype=torch.bfloat16)
    path = save_lora(folder, "kohya_sd2_ldm.safetensors", sd, kohya_metadata("sd_v2", 2, 1.0))
    return lora_case(path, sd, "sd2", "kohya-ldm", 2, 1.0, "bf16")


@case("kohya-sd2-misleading-metadata")
def kohya_sd2_lying(folder: Path) -> Case:
    """Metadata says SD1, the 1024-wide tensors say SD2: shapes win."""
    targets = te_targets("openclip_h", "lora_te") | unet_targets("sd2", ldm=False)
    sd = kohya_lora(targets, rank=2, alpha=1.0, dtype=torch.float16)
    path = save_lora(folder, "kohya_sd2.safetensors", sd, kohya_metadata("sd_v1", 2, 1.0) | {"ss_v2": "False"})
    return lora_case(path, sd, "sd2", "kohya", 2, 1.0, "fp16")


@case("kohya-sdxl-ldm")
def kohya_sdxl(folder: Path) -> Case:
    targets = te_targets("clip_l", "lora_te1") | te_targets("bigg", "lora_te2") | unet_targets("sdxl", ldm=True)
    sd = kohya_lora(targets, rank=2, alpha=1.0, dtype=torch.float16)
    path = save_lora(folder, "kohya_sdxl.safetensors", sd, kohya_metadata("sdxl_base_v1-0", 2, 1.0))
    return lora_case(path, sd, "sdxl", "kohya-ldm", 2, 1.0, "fp16")


@case("kohya-sdxl-diffusers-names")
def kohya_sdxl_diffusers(folder: Path) -> Case:
    """SDXL from trainers that flatten diffusers paths (`lora_unet_down_blocks_1_attentions_0_...`)."""
    targets = te_targets("clip_l", "lora_te1") | te_targets("bigg", "lora_te2") | unet_targets("sdxl", ldm=False)
    sd = kohya_lora(targets, rank=2, alpha=16.0, dtype=torch.float16)
    path = save_lora(folder, "sdxl_diffusers_names.safetensors", sd)
    return lora_case(path, sd, "sdxl", "kohya", 2, 16.0, "fp16")


@case("kohya-sdxl-ldm-unet-self-attn-only")
def kohya_sdxl_no_attn2(folder: Path) -> Case:
    """No attn2 and no text encoder: only the depth-10 block structure says SDXL (FORMATS.md §1.7)."""
    pattern = r"attentions\.\d+\.transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)$"
    sd = kohya_lora(unet_targets("sdxl", ldm=True, pattern=pattern), rank=4, alpha=4.0, dtype=torch.bfloat16)
    path = save_lora(folder, "sdxl_attn1.safetensors", sd)
    return lora_case(path, sd, "sdxl", "kohya-ldm", 4, 4.0, "bf16")


@case("kohya-sd1-locon-conv")
def kohya_sd1_conv(folder: Path) -> Case:
    """kohya's networks.lora with conv_dim: 3x3 downs on resnets; conv rank 8 > linear rank 4."""
    gen = _gen(1)
    sd = kohya_lora(unet_targets("sd1", ldm=False), rank=4, alpha=1.0, dtype=torch.float16)
    for name, shape in unet_targets("sd1", ldm=False, pattern=KOHYA_CONV_TARGETS).items():
        rank = 8 if len(shape) == 4 and shape[2] == 3 else 4
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = lora_pair(shape, rank, torch.float16, gen)
        sd[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    meta = kohya_metadata("sd_v1", 4, 1.0, args={"conv_dim": "8", "conv_alpha": "1"})
    path = save_lora(folder, "locon_conv.safetensors", sd, meta)
    return lora_case(path, sd, "sd1", "kohya", 8, 1.0, "fp16")


def attn_processor_lora(prefix: str = "") -> dict[str, torch.Tensor]:
    """Old diffusers attention-processor LoRA on every SD1 attention: `...attn1.processor.to_q_lora.down.weight`."""
    gen = _gen(2)
    sd = {}
    names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    pattern = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
    for path, shape in layer_shapes(meta_unet("sd1"), pattern).items():
        attn, proj = re.match(r"(.*attn[12])\.(.*)$", path).groups()
        key = f"{prefix}{attn}.processor.{names[proj]}"
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = lora_pair(shape, 4, torch.float32, gen)
    return sd


@case("legacy-attn-processor-sd1")
def legacy_attn_processor(folder: Path) -> Case:
    """`unet.save_attn_procs` of early 2023: pytorch_lora_weights.bin, no alpha."""
    sd = attn_processor_lora()
    path = folder / "pytorch_lora_weights.bin"
    torch.save(sd, path)
    return lora_case(path, sd, "sd1", "diffusers-legacy", 4, 4.0, "fp32")


@case("legacy-attn-processor-sd1-unet-prefix")
def legacy_attn_processor_prefixed(folder: Path) -> Case:
    """The same keys as later written, with a `unet.` prefix, as safetensors."""
    sd = attn_processor_lora("unet.")
    path = save_lora(folder, "pytorch_lora_weights.safetensors", sd)
    return lora_case(path, sd, "sd1", "diffusers-legacy", 4, 4.0, "fp32")


# ----------------------------------------------------------------------------------------------
# LoRAs written by peft and diffusers on tiny models


def _train_like(model: torch.nn.Module, seed: int) -> None:
    """peft starts lora_B at zero; give it values as training would."""
    gen = _gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _lora_config(targets: list[str], rank: int = 4, alpha: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)


@functools.lru_cache(maxsize=None)
def peft_layers(base: str) -> dict[str, Any]:
    """peft-injected tiny UNet + text encoder(s): component -> (state dict, LoraConfig)."""
    from peft.utils import get_peft_model_state_dict

    from adapterzoo import tiny_models

    torch.manual_seed(0)
    models = {"unet": (tiny_models.tiny_unet(base), UNET_ATTN),
              "text_encoder": (tiny_models.tiny_text_encoder(base), CLIP_ATTN)}
    if base == "sdxl":
        models["text_encoder_2"] = (tiny_models.tiny_text_encoder(base, 2), CLIP_ATTN)
    out = {}
    for i, (component, (model, targets)) in enumerate(models.items()):
        config = _lora_config(targets)
        model.add_adapter(config)
        _train_like(model, seed=i)
        out[component] = (get_peft_model_state_dict(model), config)
    return out


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _diffusers_save(base: str, folder: Path, with_metadata: bool) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    layers = peft_layers(base)
    kwargs = {f"{c}_lora_layers": sd for c, (sd, _) in layers.items()}
    if with_metadata:
        kwargs |= {f"{c}_lora_adapter_metadata": cfg.to_dict() for c, (_, cfg) in layers.items()}
    pipeline = StableDiffusionXLPipeline if base == "sdxl" else StableDiffusionPipeline
    pipeline.save_lora_weights(folder, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


@case("diffusers-peft-sd1")
def diffusers_sd1(folder: Path) -> Case:
    """diffusers 0.42 + transformers 5: `text_encoder.encoder.layers...` (no text_model.); no alphas."""
    path = _diffusers_save("sd1", folder, with_metadata=False)
    sd = read_safetensors(path)
    assert any(k.startswith("text_encoder.encoder.layers.") for k in sd)
    return lora_case(path, sd, "sd1", "diffusers", 4, 4.0, "fp32")


@case("diffusers-peft-sd1-adapter-metadata")
def diffusers_sd1_meta(folder: Path) -> Case:
    """With `lora_adapter_metadata` the saved LoraConfig says lora_alpha 8."""
    path = _diffusers_save("sd1", folder, with_metadata=True)
    sd = read_safetensors(path)
    return lora_case(path, sd, "sd1", "diffusers", 4, 8.0, "fp32")


@case("diffusers-peft-sd1-text-model")
def diffusers_sd1_text_model(folder: Path) -> Case:
    """What older diffusers wrote: `text_encoder.text_model.encoder.layers...`."""
    sd = read_safetensors(_diffusers_save("sd1", folder / "orig", with_metadata=False))
    sd = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in sd.items()}
    path = save_lora(folder, "pytorch_lora_weights.safetensors", sd, {"format": "pt"})
    return lora_case(path, sd, "sd1", "diffusers", 4, 4.0, "fp32")


@case("diffusers-peft-sdxl")
def diffusers_sdxl(folder: Path) -> Case:
    path = _diffusers_save("sdxl", folder, with_metadata=False)
    sd = read_safetensors(path)
    assert any(k.startswith("text_encoder_2.") for k in sd)
    return lora_case(path, sd, "sdxl", "diffusers", 4, 4.0, "fp32")


@case("diffusers-transitional-sd1")
def diffusers_transitional(folder: Path) -> Case:
    """diffusers' own convert_state_dict_to_diffusers: `.lora.down.weight` / `lora_linear_layer`."""
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = peft_layers("sd1")
    peft_sd = {f"{c}.{k}": v for c, (sd, _) in layers.items() for k, v in sd.items()}
    sd = convert_state_dict_to_diffusers(peft_sd)
    sd = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in sd.items()}
    assert any(".lora_linear_layer.down." in k for k in sd) and any(".lora.down." in k for k in sd)
    path = save_lora(folder, "pytorch_lora_weights.safetensors", sd, {"format": "pt"})
    return lora_case(path, sd, "sd1", "diffusers-legacy", 4, 4.0, "fp32")


@case("diffusers-to-kohya-sd1")
def diffusers_kohya_sd1(folder: Path) -> Case:
    """diffusers' convert_state_dict_to_kohya: lora_te1 even for SD1, int64 alpha = rank."""
    from diffusers.utils import convert_state_dict_to_kohya

    layers = peft_layers("sd1")
    sd = convert_state_dict_to_kohya({f"{c}.{k}": v for c, (sd, _) in layers.items() for k, v in sd.items()})
    assert any(k.startswith("lora_te1_") for k in sd)
    path = save_lora(folder, "kohya_from_diffusers.safetensors", sd)
    return lora_case(path, sd, "sd1", "kohya", 4, 4.0, "fp32")


@case("diffusers-to-kohya-sdxl")
def diffusers_kohya_sdxl(folder: Path) -> Case:
    """SDXL with diffusers-named UNet keys (`lora_unet_down_blocks_1_...`) and lora_te1/lora_te2."""
    from diffusers.utils import convert_state_dict_to_kohya

    layers = peft_layers("sdxl")
    sd = convert_state_dict_to_kohya({f"{c}.{k}": v for c, (sd, _) in layers.items() for k, v in sd.items()})
    assert any(k.startswith("lora_te2_") for k in sd)
    path = save_lora(folder, "kohya_from_diffusers_sdxl.safetensors", sd)
    return lora_case(path, sd, "sdxl", "kohya", 4, 4.0, "fp32")


def _peft_folder(folder: Path) -> Path:
    from peft import get_peft_model

    from adapterzoo import tiny_models

    torch.manual_seed(1)
    model = get_peft_model(tiny_models.tiny_unet("sd1"), _lora_config(UNET_ATTN, rank=4, alpha=16))
    _train_like(model, seed=5)
    model.save_pretrained(folder)
    return folder


@case("peft-folder")
def peft_folder(folder: Path) -> Case:
    """PeftModel.save_pretrained: adapter_model.safetensors (`base_model.model.` keys) + adapter_config.json."""
    out = _peft_folder(folder / "adapter")
    sd = read_safetensors(out / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in sd)
    return lora_case(out, sd, "sd1", "peft", 4, 16.0, "fp32")


@case("peft-file-alone")
def peft_file_alone(folder: Path) -> Case:
    """The same weights without their adapter_config.json: no alpha anywhere, so alpha = rank."""
    sd = read_safetensors(_peft_folder(folder / "adapter") / "adapter_model.safetensors")
    path = save_lora(folder, "adapter_model.safetensors", sd)
    return lora_case(path, sd, "sd1", "peft", 4, 4.0, "fp32")


def _peft_components_case(base: str, folder: Path, configs: dict[str, Any]) -> Case:
    """One PeftModel.save_pretrained per model part, into unet/, text_encoder/, ... (peft's DreamBooth
    example); the answer is read back from what was written: ranks from the lora_A shapes, alpha from
    the saved configs."""
    from peft import get_peft_model

    from adapterzoo import tiny_models

    torch.manual_seed(2)
    models = {"unet": tiny_models.tiny_unet(base), "text_encoder": tiny_models.tiny_text_encoder(base)}
    if base == "sdxl":
        models["text_encoder_2"] = tiny_models.tiny_text_encoder(base, 2)
    sd: dict[str, torch.Tensor] = {}
    saved: dict[str, dict[str, Any]] = {}
    for i, (component, model) in enumerate(models.items()):
        peft_model = get_peft_model(model, configs[component])
        _train_like(peft_model, seed=20 + i)
        peft_model.save_pretrained(folder / "adapter" / component)
        sd |= {f"{component}/{k}": v for k, v in
               read_safetensors(folder / "adapter" / component / "adapter_model.safetensors").items()}
        saved[component] = json.loads((folder / "adapter" / component / "adapter_config.json").read_text())
    assert not (folder / "adapter" / "adapter_config.json").exists()
    ranks = sorted({v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")})
    alphas = {float(config["lora_alpha"]) for config in saved.values()}
    assert len(alphas) == 1, "one alpha for all parts, so the expected alpha is not a tie-break"
    details: dict[str, Any] = {"components": sorted(models)}
    if len(ranks) > 1:
        details["ranks"] = ranks
    if any(config.get("use_rslora") for config in saved.values()):
        details["rslora"] = True
    return lora_case(folder / "adapter", sd, base, "peft", max(ranks), alphas.pop(), "fp32", **details)


@case("peft-components-sd1")
def peft_components_sd1(folder: Path) -> Case:
    """unet/ and text_encoder/ adapters with different ranks: rank is the largest, `ranks` lists both."""
    return _peft_components_case("sd1", folder, {
        "unet": _lora_config(UNET_ATTN, rank=4, alpha=8), "text_encoder": _lora_config(CLIP_ATTN, rank=2, alpha=8),
    })


@case("peft-components-sdxl")
def peft_components_sdxl(folder: Path) -> Case:
    """SDXL's text_encoder_2/ (with rsLoRA) beside text_encoder/ and unet/."""
    from peft import LoraConfig

    return _peft_components_case("sdxl", folder, {
        "unet": _lora_config(UNET_ATTN, rank=4, alpha=6),
        "text_encoder": _lora_config(CLIP_ATTN, rank=4, alpha=6),
        "text_encoder_2": LoraConfig(r=4, lora_alpha=6, use_rslora=True, init_lora_weights="gaussian",
                                     target_modules=CLIP_ATTN),
    })


# ----------------------------------------------------------------------------------------------
# The real cloneofsimo files

REAL = Path(__file__).resolve().parent / "fixtures" / "real"


@case("cloneofsimo-analog")
def cloneofsimo_analog(folder: Path) -> Case:
    path = REAL / "analog_svd_rank4.safetensors"
    return Case(path, {"kind": "lora", "base": "sd1", "format": "cloneofsimo", "rank": 4, "alpha": 4.0,
                       "dtype": "fp16", "tensors": 384})


@case("cloneofsimo-disney")
def cloneofsimo_disney(folder: Path) -> Case:
    path = REAL / "lora_disney.safetensors"
    return Case(path, {"kind": "lora", "base": "sd1", "format": "cloneofsimo", "rank": 1, "alpha": 1.0,
                       "dtype": "fp32", "tensors": 386})


# ----------------------------------------------------------------------------------------------
# LyCORIS (written key by key: the lycoris package is not a dependency)

LYCORIS_LINEAR = r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$"


def lycoris_meta(algo: str, dim: int, alpha: float, **extra: Any) -> dict[str, str]:
    return kohya_metadata("sd_v1", dim, alpha, module="lycoris.kohya", args={"algo": algo, **extra})


def factor(n: int) -> tuple[int, int]:
    """LyCORIS' factorization(n, -1): the split m <= k with m * k = n closest to sqrt(n)."""
    m = int(math.isqrt(n))
    while n % m:
        m -= 1
    return m, n // m


@case("lycoris-locon-tucker")
def lycoris_locon(folder: Path) -> Case:
    """LoCon with use_tucker: 3x3 convs get lora_mid [r,r,3,3] between 1x1 down/up. Mixed alphas."""
    gen = _gen(3)
    sd = kohya_lora(unet_targets("sd1", ldm=False, pattern=LYCORIS_LINEAR), rank=8, alpha=4.0, dtype=torch.float16)
    for name, shape in unet_targets("sd1", ldm=False, pattern=KOHYA_CONV_TARGETS).items():
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = lora_pair(shape, 4, torch.float16, gen,
                                                                                 conv_down_kernel=False)
        if len(shape) == 4 and shape[2] == 3:
            sd[f"{name}.lora_mid.weight"] = randn((4, 4, 3, 3), torch.float16, gen)
        sd[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    path = save_lora(folder, "locon.safetensors", sd, lycoris_meta("locon", 8, 4.0, conv_dim=4, conv_alpha=1,
                                                                    use_tucker=True))
    linear_modules = len(unet_targets("sd1", ldm=False, pattern=LYCORIS_LINEAR))
    conv_modules = len(unet_targets("sd1", ldm=False, pattern=KOHYA_CONV_TARGETS))
    alpha = 4.0 if linear_modules > conv_modules else 1.0
    return lora_case(path, sd, "sd1", "lycoris", 8, alpha, "fp16", kind="lycoris", algo="locon")


@case("lycoris-locon-plain")
def lycoris_locon_plain(folder: Path) -> Case:
    """Plain LoCon saved by LyCORIS: keys are exactly kohya's (3x3 conv downs), so the keys decide:
    a kohya LoRA, whatever `ss_network_module` says."""
    gen = _gen(4)
    sd = kohya_lora(unet_targets("sd1", ldm=False), rank=4, alpha=2.0, dtype=torch.float16)
    for name, shape in unet_targets("sd1", ldm=False, pattern=KOHYA_CONV_TARGETS).items():
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = lora_pair(shape, 4, torch.float16, gen)
        sd[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    path = save_lora(folder, "locon_plain.safetensors", sd, lycoris_meta("locon", 4, 2.0, conv_dim=4, conv_alpha=2))
    return lora_case(path, sd, "sd1", "kohya", 4, 2.0, "fp16")


@case("lycoris-loha")
def lycoris_loha(folder: Path) -> Case:
    gen = _gen(5)
    sd = {}
    targets = unet_targets("sd1", ldm=False, pattern=LYCORIS_LINEAR)
    targets |= {k: s for k, s in unet_targets("sd1", ldm=False, pattern=KOHYA_CONV_TARGETS).items() if len(s) == 4}
    for name, shape in targets.items():
        out_dim, in_dim = shape[0], math.prod(shape[1:])
        for w in ("w1", "w2"):
            sd[f"{name}.hada_{w}_a"] = randn((out_dim, 4), torch.float16, gen)
            sd[f"{name}.hada_{w}_b"] = randn((4, in_dim), torch.float16, gen)
        sd[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.float16)
    path = save_lora(folder, "loha.safetensors", sd, lycoris_meta("loha", 4, 2.0))
    return lora_case(path, sd, "sd1", "lycoris", 4, 2.0, "fp16", kind="lycoris", algo="loha")


def lokr_lora() -> dict[str, torch.Tensor]:
    """Decomposed w2 (lokr_w2_a/b, rank 4) on attention, both factors full on the feed-forward."""
    gen = _gen(6)
    sd = {}
    for name, shape in unet_targets("sd1", ldm=False, pattern=LYCORIS_LINEAR).items():
        (a, b), (c, d) = factor(shape[0]), factor(shape[1])
        sd[f"{name}.lokr_w1"] = randn((a, c), torch.float16, gen)
        if "_ff_" in name:
            sd[f"{name}.lokr_w2"] = randn((b, d), torch.float16, gen)
        else:
            sd[f"{name}.lokr_w2_a"] = randn((b, 4), torch.float16, gen)
            sd[f"{name}.lokr_w2_b"] = randn((4, d), torch.float16, gen)
        sd[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    return sd


@case("lycoris-lokr")
def lycoris_lokr(folder: Path) -> Case:
    sd = lokr_lora()
    path = save_lora(folder, "lokr.safetensors", sd, lycoris_meta("lokr", 4, 1.0, factor=-1))
    return lora_case(path, sd, "sd1", "lycoris", 4, 1.0, "fp16", kind="lycoris", algo="lokr")


@case("lycoris-lokr-no-metadata")
def lycoris_lokr_bare(folder: Path) -> Case:
    """kron(w1, w2) is the target's shape: attn2.to_k in = 24 * 32 = 768 says SD1 without any hint."""
    sd = lokr_lora()
    path = save_lora(folder, "lokr.safetensors", sd)
    return lora_case(path, sd, "sd1", "lycoris", 4, 1.0, "fp16", kind="lycoris", algo="lokr")


@case("lycoris-ia3")
def lycoris_ia3(folder: Path) -> Case:
    gen = _gen(7)
    sd = {}
    pattern = r"transformer_blocks\.\d+\.(attn[12]\.(to_k|to_v)|ff\.net\.2)$"
    for name, shape in unet_targets("sd1", ldm=False, pattern=pattern).items():
        on_input = "_ff_" in name
        sd[f"{name}.weight"] = randn((shape[1] if on_input else shape[0],), torch.float32, gen)
        sd[f"{name}.on_input"] = torch.tensor(on_input)
    path = save_lora(folder, "ia3.safetensors", sd, lycoris_meta("ia3", 1, 1.0))
    return lora_case(path, sd, "sd1", "lycoris", None, None, "fp32", kind="lycoris", algo="ia3")


@case("lycoris-full")
def lycoris_full(folder: Path) -> Case:
    gen = _gen(8)
    sd = {}
    pattern = r"down_blocks\.0\..*attn2\.(to_k|to_v)$"
    for name, shape in unet_targets("sd1", ldm=False, pattern=pattern).items():
        sd[f"{name}.diff"] = randn(shape, torch.float16, gen)
        sd[f"{name}.diff_b"] = randn((shape[0],), torch.float16, gen)
    path = save_lora(folder, "full.safetensors", sd, lycoris_meta("full", 1, 1.0))
    return lora_case(path, sd, "sd1", "lycoris", None, None, "fp16", kind="lycoris", algo="full")


@case("lycoris-dora")
def lycoris_dora(folder: Path) -> Case:
    """LoRA with dora_wd: kohya keys plus `dora_scale` [out, 1] per module (wd_on_out)."""
    gen = _gen(9)
    targets = te_targets("clip_l", "lora_te") | unet_targets("sd1", ldm=False)
    sd = kohya_lora(targets, rank=4, alpha=2.0, dtype=torch.float16, seed=9)
    for name, shape in targets.items():
        sd[f"{name}.dora_scale"] = randn((shape[0], 1), torch.float16, gen, std=1.0)
    path = save_lora(folder, "dora.safetensors", sd, lycoris_meta("lora", 4, 2.0, dora_wd=True))
    return lora_case(path, sd, "sd1", "kohya", 4, 2.0, "fp16", dora=True)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_case(path: Path, specs: Specs, base: str, fmt: str = "ldm", dtype: str = "fp16",
                    kind: str = "checkpoint", **details: Any) -> Case:
    return Case(path, {"kind": kind, "base": base, "format": fmt, "dtype": dtype, "tensors": len(specs)}, details)


def _sparse_checkpoint(folder: Path, name: str, specs: Specs) -> Path:
    return write_sparse_safetensors(folder / name, specs)


@case("ckpt-sd1-ldm")
def ckpt_sd1(folder: Path) -> Case:
    specs = sd_checkpoint_specs("sd1")
    assert specs["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1] == (320, 768)
    return checkpoint_case(_sparse_checkpoint(folder, "sd15.safetensors", specs), specs, "sd1")


@case("ckpt-sd2-ldm")
def ckpt_sd2(folder: Path) -> Case:
    specs = sd_checkpoint_specs("sd2")
    assert specs["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"][1] == (320, 1024)
    return checkpoint_case(_sparse_checkpoint(folder, "sd21.safetensors", specs), specs, "sd2")


@case("ckpt-sdxl-sgm")
def ckpt_sdxl(folder: Path) -> Case:
    specs = sd_checkpoint_specs("sdxl")
    assert specs["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"][1] == (640, 2048)
    assert specs["model.diffusion_model.label_emb.0.0.weight"][1] == (1280, 2816)
    return checkpoint_case(_sparse_checkpoint(folder, "sdxl.safetensors", specs), specs, "sdxl")


@case("ckpt-sd1-inpaint")
def ckpt_sd1_inpaint(folder: Path) -> Case:
    specs = sd_checkpoint_specs("sd1", in_channels=9)
    assert specs["model.diffusion_model.input_blocks.0.0.weight"][1] == (320, 9, 3, 3)
    return checkpoint_case(_sparse_checkpoint(folder, "sd15_inpaint.safetensors", specs), specs, "sd1",
                           variant="inpaint")


@case("ckpt-sdxl-inpaint")
def ckpt_sdxl_inpaint(folder: Path) -> Case:
    specs = sd_checkpoint_specs("sdxl", in_channels=9)
    return checkpoint_case(_sparse_checkpoint(folder, "sdxl_inpaint.safetensors", specs), specs, "sdxl",
                           variant="inpaint")


@case("ckpt-sd1-fp32-ema-keys")
def ckpt_sd1_fp32(folder: Path) -> Case:
    """Full-precision with LDM schedule buffers and a few EMA keys next to the weights."""
    specs = sd_checkpoint_specs("sd1", dtype="F32")
    specs |= {"betas": ("F32", (1000,)), "model_ema.decay": ("F32", ()), "model_ema.num_updates": ("I64", ()),
              "model_ema.diffusion_modelinput_blocks00weight": ("F32", (320, 4, 3, 3))}
    return checkpoint_case(_sparse_checkpoint(folder, "sd15_fp32.safetensors", specs), specs, "sd1", dtype="fp32")


@case("ckpt-sd1-pickle")
def ckpt_sd1_pickle(folder: Path) -> Case:
    """A Lightning .ckpt: {"state_dict": ..., "global_step": ...}, small but with real-width probe keys."""
    gen = _gen(10)
    keep = re.compile(r"(input_blocks\.(0|1)\.|middle_block\.1\.proj_in|out\.2|encoder\.conv_in|"
                      r"decoder\.conv_out|layers\.0\.self_attn|final_layer_norm|position_ids)")
    specs = {k: v for k, v in sd_checkpoint_specs("sd1").items() if keep.search(k)}
    state = {k: (torch.arange(77).unsqueeze(0) if dtype == "I64" else randn(shape, torch.float16, gen))
             for k, (dtype, shape) in specs.items() if k != "alphas_cumprod"}
    path = folder / "sd15.ckpt"
    torch.save({"state_dict": state, "global_step": 840000, "epoch": 6}, path)
    assert path.stat().st_size < 20e6
    return Case(path, {"kind": "checkpoint", "base": "sd1", "format": "ldm", "dtype": "fp16",
                       "tensors": len(state)})


@case("unet-only-sd1-prefixed")
def unet_only_sd1(folder: Path) -> Case:
    specs = prefixed("model.diffusion_model.", unet_ldm_specs("sd1", "F16"))
    return checkpoint_case(_sparse_checkpoint(folder, "unet.safetensors", specs), specs, "sd1",
                           components=["unet"])


@case("unet-only-sdxl-bare")
def unet_only_sdxl(folder: Path) -> Case:
    """ComfyUI 'diffusion model' file: LDM UNet keys without any prefix."""
    specs = unet_ldm_specs("sdxl", "F16")
    return checkpoint_case(_sparse_checkpoint(folder, "sdxl_unet.safetensors", specs), specs, "sdxl",
                           components=["unet"])


@case("vae-ldm")
def vae_ldm(folder: Path) -> Case:
    """A standalone VAE as A1111 users keep them: LDM names, no prefix."""
    specs = vae_ldm_specs("F32")
    path = _sparse_checkpoint(folder, "vae-ft-mse.safetensors", specs)
    return Case(path, {"kind": "vae", "dtype": "fp32", "tensors": len(specs)})


@case("vae-diffusers-file")
def vae_diffusers(folder: Path) -> Case:
    """diffusers' own AutoencoderKL weights file (encoder.down_blocks...), from the tiny VAE."""
    from adapterzoo import tiny_models

    torch.manual_seed(0)
    vae = tiny_models.tiny_vae()
    vae.save_pretrained(folder / "vae")
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    return Case(path, {"kind": "vae", "dtype": "fp32", "tensors": len(vae.state_dict())})


def _tiny_folder(base: str, folder: Path) -> Case:
    from adapterzoo import tiny_models

    out = tiny_models.save_tiny_pipeline(base, folder / f"tiny-{base}")
    return Case(out, {"kind": "checkpoint", "base": base, "format": "diffusers", "dtype": "fp32"})


@case("diffusers-folder-sd1")
def folder_sd1(folder: Path) -> Case:
    return _tiny_folder("sd1", folder)


@case("diffusers-folder-sd2")
def folder_sd2(folder: Path) -> Case:
    return _tiny_folder("sd2", folder)


@case("diffusers-folder-sdxl")
def folder_sdxl(folder: Path) -> Case:
    return _tiny_folder("sdxl", folder)


@case("diffusers-folder-sd1-inpaint")
def folder_sd1_inpaint(folder: Path) -> Case:
    from diffusers import UNet2DConditionModel

    from adapterzoo import tiny_models

    pipe = tiny_models.tiny_pipeline("sd1")
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "in_channels": 9})
    out = folder / "tiny-sd1-inpaint"
    pipe.save_pretrained(out)
    return Case(out, {"kind": "checkpoint", "base": "sd1", "format": "diffusers"}, {"variant": "inpaint"})


def _sd3_specs(depth: int = 24) -> Specs:
    """SD3-medium MMDiT single file: joint_blocks (no q/k norms: those are SD3.5's), x_embedder, plus its 16-channel
    VAE and CLIP-L."""
    hidden, dt = 64 * depth, "F16"
    p = "model.diffusion_model."
    specs: Specs = {p + "x_embedder.proj.weight": (dt, (hidden, 16, 2, 2)), p + "x_embedder.proj.bias": (dt, (hidden,)),
                    p + "pos_embed": (dt, (1, 36864, hidden)), p + "context_embedder.weight": (dt, (hidden, 4096)),
                    p + "t_embedder.mlp.0.weight": (dt, (hidden, 256)),
                    p + "t_embedder.mlp.2.weight": (dt, (hidden, hidden)),
                    p + "y_embedder.mlp.0.weight": (dt, (hidden, 2048)),
                    p + "y_embedder.mlp.2.weight": (dt, (hidden, hidden)),
                    p + "final_layer.linear.weight": (dt, (64, hidden)),
                    p + "final_layer.adaLN_modulation.1.weight": (dt, (2 * hidden, hidden))}
    for i in range(depth):
        for block in ("context_block", "x_block"):
            q = f"{p}joint_blocks.{i}.{block}."
            last_context = block == "context_block" and i == depth - 1  # pre_only: no proj, no mlp
            specs[q + "adaLN_modulation.1.weight"] = (dt, ((2 if last_context else 6) * hidden, hidden))
            specs[q + "attn.qkv.weight"] = (dt, (3 * hidden, hidden))
            if not last_context:
                specs[q + "attn.proj.weight"] = (dt, (hidden, hidden))
                specs[q + "mlp.fc1.weight"] = (dt, (4 * hidden, hidden))
                specs[q + "mlp.fc2.weight"] = (dt, (hidden, 4 * hidden))
    specs |= prefixed("first_stage_model.", vae_ldm_specs(dt, latent_channels=16))
    specs |= prefixed("text_encoders.clip_l.transformer.", clip_hf_specs("clip_l", dt))
    return specs


@case("ckpt-sd3")
def ckpt_sd3(folder: Path) -> Case:
    specs = _sd3_specs()
    return checkpoint_case(_sparse_checkpoint(folder, "sd3_medium.safetensors", specs), specs, "sd3")


def _flux_specs(guidance: bool) -> Specs:
    """BFL's flux1-dev/schnell.safetensors: unprefixed double_blocks/single_blocks, bf16."""
    dt, h = "BF16", 3072
    specs: Specs = {"img_in.weight": (dt, (h, 64)), "img_in.bias": (dt, (h,)), "txt_in.weight": (dt, (h, 4096)),
                    "txt_in.bias": (dt, (h,)), "time_in.in_layer.weight": (dt, (h, 256)),
                    "time_in.out_layer.weight": (dt, (h, h)), "vector_in.in_layer.weight": (dt, (h, 768)),
                    "vector_in.out_layer.weight": (dt, (h, h)), "final_layer.linear.weight": (dt, (64, h)),
                    "final_layer.adaLN_modulation.1.weight": (dt, (2 * h, h))}
    if guidance:
        specs |= {"guidance_in.in_layer.weight": (dt, (h, 256)), "guidance_in.out_layer.weight": (dt, (h, h))}
    for i in range(19):
        for stream in ("img", "txt"):
            q = f"double_blocks.{i}.{stream}_"
            specs |= {q + "mod.lin.weight": (dt, (6 * h, h)), q + "attn.qkv.weight": (dt, (3 * h, h)),
                      q + "attn.norm.query_norm.scale": (dt, (128,)), q + "attn.norm.key_norm.scale": (dt, (128,)),
                      q + "attn.proj.weight": (dt, (h, h)), q + "mlp.0.weight": (dt, (4 * h, h)),
                      q + "mlp.2.weight": (dt, (h, 4 * h))}
    for i in range(38):
        q = f"single_blocks.{i}."
        specs |= {q + "linear1.weight": (dt, (3 * h + 4 * h, h)), q + "linear2.weight": (dt, (h, h + 4 * h)),
                  q + "norm.query_norm.scale": (dt, (128,)), q + "norm.key_norm.scale": (dt, (128,)),
                  q + "modulation.lin.weight": (dt, (3 * h, h))}
    return specs


@case("ckpt-flux-dev")
def ckpt_flux_dev(folder: Path) -> Case:
    specs = _flux_specs(guidance=True)
    return checkpoint_case(_sparse_checkpoint(folder, "flux1-dev.safetensors", specs), specs, "flux", dtype="bf16")


@case("ckpt-flux-schnell")
def ckpt_flux_schnell(folder: Path) -> Case:
    specs = _flux_specs(guidance=False)
    return checkpoint_case(_sparse_checkpoint(folder, "flux1-schnell.safetensors", specs), specs, "flux",
                           dtype="bf16")


# ----------------------------------------------------------------------------------------------
# Textual-inversion embeddings and hypernetworks


def a1111_embedding(vectors: torch.Tensor, name: str) -> dict[str, Any]:
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 3000,
            "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned-emaonly"}


def embedding_case(path: Path, base: str, fmt: str, vectors: int, dtype: str, tensors: int) -> Case:
    return Case(path, {"kind": "embedding", "base": base, "format": fmt, "dtype": dtype, "tensors": tensors},
                {"vectors": vectors})


@case("embedding-a1111-sd1")
def emb_a1111_sd1(folder: Path) -> Case:
    path = folder / "my-style.pt"
    torch.save(a1111_embedding(randn((2, 768), torch.float32, _gen(11)), "my-style"), path)
    return embedding_case(path, "sd1", "a1111", 2, "fp32", 1)


@case("embedding-a1111-sd2")
def emb_a1111_sd2(folder: Path) -> Case:
    path = folder / "sd2-style.pt"
    torch.save(a1111_embedding(randn((3, 1024), torch.float32, _gen(12)), "sd2-style"), path)
    return embedding_case(path, "sd2", "a1111", 3, "fp32", 1)


@case("embedding-textual-inversion-parameterdict")
def emb_parameterdict(folder: Path) -> Case:
    """The original textual_inversion repo: string_to_param is an nn.ParameterDict, token ids are tensors."""
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(randn((1, 768), torch.float32, _gen(13)))})
    path = folder / "learned.pt"
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)
    return Case(path, {"kind": "embedding", "base": "sd1", "format": "a1111", "dtype": "fp32"}, {"vectors": 1})


@case("embedding-kohya-sd1")
def emb_kohya(folder: Path) -> Case:
    sd = {"emb_params": randn((4, 768), torch.float16, _gen(14))}
    path = save_lora(folder, "kohya_emb.safetensors", sd)
    return embedding_case(path, "sd1", "kohya", 4, "fp16", 1)


@case("embedding-kohya-sdxl")
def emb_sdxl(folder: Path) -> Case:
    gen = _gen(15)
    sd = {"clip_l": randn((2, 768), torch.float16, gen), "clip_g": randn((2, 1280), torch.float16, gen)}
    path = save_lora(folder, "sdxl_emb.safetensors", sd)
    return embedding_case(path, "sdxl", "kohya", 2, "fp16", 2)


@case("embedding-diffusers-safetensors")
def emb_diffusers_st(folder: Path) -> Case:
    path = save_lora(folder, "learned_embeds.safetensors", {"<cat-toy>": randn((768,), torch.float32, _gen(16))})
    return embedding_case(path, "sd1", "diffusers", 1, "fp32", 1)


@case("embedding-diffusers-bin")
def emb_diffusers_bin(folder: Path) -> Case:
    path = folder / "learned_embeds.bin"
    torch.save({"<cat-toy>": randn((768,), torch.float32, _gen(17))}, path)
    return embedding_case(path, "sd1", "diffusers", 1, "fp32", 1)


def hypernetwork_module(dim: int, gen: torch.Generator) -> OrderedDict:
    """layer_structure [1, 2, 1], relu, no layer norm: linear.0 (d -> 2d), linear.2 (2d -> d)."""
    return OrderedDict([
        ("linear.0.weight", randn((2 * dim, dim), torch.float32, gen)), ("linear.0.bias", torch.zeros(2 * dim)),
        ("linear.2.weight", randn((dim, 2 * dim), torch.float32, gen)), ("linear.2.bias", torch.zeros(dim)),
    ])


@case("hypernetwork-a1111")
def hypernetwork(folder: Path) -> Case:
    gen = _gen(18)
    hn: dict[Any, Any] = {dim: (hypernetwork_module(dim, gen), hypernetwork_module(dim, gen))
                          for dim in (768, 320, 640, 1280)}
    hn |= {"step": 2000, "name": "anime-hn", "layer_structure": [1.0, 2.0, 1.0], "activation_func": "relu",
           "is_layer_norm": False, "weight_initialization": "Normal", "sd_checkpoint": "cc6cb27103",
           "sd_checkpoint_name": "v1-5-pruned-emaonly", "activate_output": False, "use_dropout": False,
           "dropout_structure": [0.0, 0.0, 0.0], "last_layer_dropout": False, "optional_info": None}
    path = folder / "anime-hn.pt"
    torch.save(hn, path)
    return Case(path, {"kind": "hypernetwork", "base": "sd1", "format": "a1111", "dtype": "fp32", "tensors": 32})


@case("unknown-safetensors")
def unknown_tensors(folder: Path) -> Case:
    """A valid safetensors file holding something else entirely (a tiny classifier)."""
    sd = {"classifier.weight": torch.zeros(10, 32), "classifier.bias": torch.zeros(10),
          "features.0.weight": torch.zeros(32, 3)}
    path = save_lora(folder, "classifier.safetensors", sd)
    return Case(path, {"kind": "unknown", "base": "unknown", "tensors": 3})


# ----------------------------------------------------------------------------------------------
# Broken and hostile files


def _small_valid(path: Path) -> Path:
    save_file({"lora_unet_a.lora_down.weight": torch.ones(4, 64), "lora_unet_a.lora_up.weight": torch.ones(64, 4)},
              str(path))
    return path


@bad("empty.safetensors")
def bad_empty(folder: Path) -> Path:
    path = folder / "empty.safetensors"
    path.write_bytes(b"")
    return path


@bad("empty.ckpt")
def bad_empty_ckpt(folder: Path) -> Path:
    path = folder / "empty.ckpt"
    path.write_bytes(b"")
    return path


@bad("truncated.safetensors")
def bad_truncated(folder: Path) -> Path:
    path = _small_valid(folder / "truncated.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])
    return path


@bad("truncated-in-header.safetensors")
def bad_truncated_header(folder: Path) -> Path:
    path = _small_valid(folder / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:40])
    return path


@bad("random.safetensors")
def bad_random(folder: Path) -> Path:
    path = folder / "random.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=_gen(19), dtype=torch.uint8).numpy().tobytes())
    return path


@bad("random.ckpt")
def bad_random_ckpt(folder: Path) -> Path:
    path = folder / "random.ckpt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=_gen(20), dtype=torch.uint8).numpy().tobytes())
    return path


@bad("truncated.ckpt")
def bad_truncated_ckpt(folder: Path) -> Path:
    path = folder / "truncated.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3)}}, path)
    path.write_bytes(path.read_bytes()[:2000])
    return path


@bad("header-offsets-past-end.safetensors")
def bad_offsets_past_end(folder: Path) -> Path:
    header = {"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}
    return write_header_only(folder / "past_end.safetensors", header, data_bytes=64)


@bad("header-overlap.safetensors")
def bad_overlap(folder: Path) -> Path:
    header = {"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
              "b": {"dtype": "F32", "shape": [16], "data_offsets": [32, 96]}}
    return write_header_only(folder / "overlap.safetensors", header, data_bytes=96)


@bad("header-hole.safetensors")
def bad_hole(folder: Path) -> Path:
    header = {"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
              "b": {"dtype": "F32", "shape": [16], "data_offsets": [128, 192]}}
    return write_header_only(folder / "hole.safetensors", header, data_bytes=192)


@bad("header-unknown-dtype.safetensors")
def bad_dtype(folder: Path) -> Path:
    header = {"a": {"dtype": "F17", "shape": [16], "data_offsets": [0, 64]}}
    return write_header_only(folder / "dtype.safetensors", header, data_bytes=64)


@bad("header-length-past-end.safetensors")
def bad_header_len(folder: Path) -> Path:
    header = {"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}
    return write_header_only(folder / "header_len.safetensors", header, data_bytes=64, header_len=10**6)


@bad("header-not-json.safetensors")
def bad_not_json(folder: Path) -> Path:
    path = folder / "not_json.safetensors"
    body = b"{this is not json}  "
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    return path


class _Payload:
    """Pickles as a call to `func(*args)`: what a malicious model file does on load."""

    def __init__(self, func: Any, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "os-system": _Payload(os.system, (f"touch {marker}",)),
        "builtins-exec": _Payload(builtins.exec, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess-popen": _Payload(subprocess.Popen, (["touch", str(marker)],)),
        "builtins-open": _Payload(builtins.open, (str(marker), "w")),
    }


HOSTILE_PAYLOADS = ("os-system", "builtins-exec", "subprocess-popen", "builtins-open")
HOSTILE_CONTAINERS = (".pt", ".ckpt", ".bin")  # torch zip, legacy torch stream, raw pickle
PICKLE_PROTOCOLS = (2, 3, 4, 5)


def hostile(payload: str, suffix: str, root: Path, protocol: int = 2) -> Hostile:
    folder = root / f"hostile{suffix.replace('.', '-')}-{payload}-p{protocol}"
    folder.mkdir(parents=True)
    marker = folder / "PWNED"
    weights: Any = torch.ones(4, 8) if suffix != ".bin" else [[1.0] * 8] * 4  # raw pickle: no torch globals
    obj = {"state_dict": {"lora_unet_a.lora_down.weight": weights}, "evil": _payloads(marker)[payload]}
    path = folder / f"model{suffix}"
    if suffix == ".pt":
        torch.save(obj, path, pickle_protocol=protocol)
    elif suffix == ".ckpt":
        torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=protocol)
    return Hostile(path, marker)


# Hostile pickles no Python object pickles to: they reach code through attribute chains, or
# name their globals in ways a naive scan misses. Hand-written opcodes (pickletools' names).


def _text(value: str) -> bytes:
    data = value.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _stack_global(module: str, name: str) -> bytes:
    return _text(module) + _text(name) + b"\x93"  # STACK_GLOBAL


def chained_pickles(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Each pickle, if ever loaded by plain pickle, runs `touch marker`; with a global it must be named by."""
    call = _text(f"touch {marker}") + b"\x85R."  # TUPLE1 REDUCE STOP
    import_os = _stack_global("builtins", "__import__") + _text("os") + b"\x85R"
    return {
        "getattr-chain": (b"\x80\x04" + _stack_global("builtins", "getattr") + import_os + _text("system")
                          + b"\x86R" + call, "builtins.getattr"),
        "attrgetter": (b"\x80\x04" + _stack_global("operator", "attrgetter") + _text("system") + b"\x85R"
                       + import_os + b"\x85R" + call, "operator.attrgetter"),
        "dotted-name": (b"\x80\x04" + _stack_global("torch", "serialization.os.system") + call,
                        "torch.serialization.os.system"),
        "memoized-names": (b"\x80\x04" + _text("os") + b"\x94" + _text("system") + b"\x94" + b"00"  # MEMOIZE, POP
                           + b"h\x00h\x01\x93" + call, "os.system"),  # BINGET 0, BINGET 1, STACK_GLOBAL
        "protocol-0-inst": (f"(S'touch {marker}'\nios\nsystem\n.".encode(), "os.system"),
    }


def torch_zip_around(path: Path, data_pkl: bytes) -> Path:
    """A real torch zip (torch.save's layout and records) whose data.pkl is replaced."""
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as src:
        records = {name: src.read(name) for name in src.namelist()}
    records[next(name for name in records if name.endswith("/data.pkl"))] = data_pkl
    with zipfile.ZipFile(path, "w") as out:
        for name, data in records.items():
            out.writestr(name, data)
    return path


def legacy_stream_around(path: Path, main: bytes) -> Path:
    """torch's pre-1.6 layout: magic number, protocol, sys info, the object, storage keys (none)."""
    from torch import serialization

    head = (serialization.MAGIC_NUMBER, serialization.PROTOCOL_VERSION, {"protocol_version": 1001})
    path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in head) + main + pickle.dumps([], protocol=2))
    return path


def legacy_tar_around(path: Path, main: bytes) -> Path:
    """torch's pre-0.4 tar layout: sys_info, pickle, storages and tensors members."""
    members = {"sys_info": pickle.dumps({"protocol_version": 1001}, protocol=2), "pickle": main,
               "storages": pickle.dumps(0, protocol=2), "tensors": pickle.dumps(0, protocol=2)}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def raw_pickle_at(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


CHAIN_CONTAINERS: dict[str, Callable[[Path, bytes], Path]] = {
    "raw": raw_pickle_at,
    "torch-zip": torch_zip_around,
    "legacy-stream": legacy_stream_around,
    "legacy-tar": legacy_tar_around,
}


def nested_hostile(root: Path, protocol: int) -> Hostile:
    """A benign-looking torch zip carrying a hostile torch file as bytes, and the call that would load it."""
    folder = root / f"nested-p{protocol}"
    folder.mkdir(parents=True)
    marker = folder / "PWNED"
    inner = io.BytesIO()
    torch.save({"evil": _payloads(marker)["os-system"]}, inner, pickle_protocol=protocol)
    load = _Payload(torch.load, (_Payload(io.BytesIO, (inner.getvalue(),)),))
    path = folder / "model.pt"
    torch.save({"w": torch.ones(2), "inner": inner.getvalue(), "load": load}, path, pickle_protocol=protocol)
    return Hostile(path, marker)


# ----------------------------------------------------------------------------------------------
# Small real files for the fake Civitai and Hub servers: real bytes, so every hash is a true one


def small_lora(path: Path, seed: int = 0, rank: int = 4) -> Path:
    """A kohya SD1 LoRA on one attention projection (~3 KB): probe calls it lora/sd1/kohya."""
    gen = _gen(seed)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = {
        f"{stem}.lora_down.weight": randn((rank, 320), torch.float16, gen),
        f"{stem}.lora_up.weight": randn((320, rank), torch.float16, gen),
        f"{stem}.alpha": torch.tensor(float(rank), dtype=torch.float16),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": str(rank)})
    return path


def save_flux_pipeline(transformer: Any, folder: Path, with_clip: bool = False) -> Path:
    """A diffusers Flux pipeline folder holding `transformer` (and a tiny CLIP text encoder when asked):
    what a Flux checkpoint folder looks like to convert, merge and --checkpoint."""
    from adapterzoo.tiny_models import tiny_text_encoder

    transformer.save_pretrained(folder / "transformer")
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    if with_clip:
        tiny_text_encoder("sd1").save_pretrained(folder / "text_encoder")
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
