"""The single-file LDM/SGM checkpoint of an SD1/SD2/SDXL diffusers pipeline folder, as a plan.

A plan lists every output tensor with its shape and dtype and a way to produce it, so the writer
streams one tensor at a time (FORMATS.md §2, §5).
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.families.sd.probe import LDM_TEXT_ENCODERS
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.safetensors_writer import PlannedTensor
from adapterzoo.formats.io.tensor_source import TensorSource, open_component
from adapterzoo.formats.model import unet_names, vae_names
from adapterzoo.formats.model.clip_names import (
    TRANSPOSED,
    fuse_in_proj,
    hf_to_openclip,
    is_openclip_root,
    strip_text_model,
)

POSITION_IDS = "embeddings.position_ids"  # a buffer; OpenCLIP has no such tensor




def diffusers_base(folder: Path) -> str:
    """sd1 / sd2 / sdxl of a diffusers pipeline folder, by its text encoders' architecture."""
    index = read_json_object(folder / "model_index.json")
    parts = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]}
    missing = {"unet", "vae", "text_encoder"} - parts
    if "transformer" in parts:
        raise BadFileError("the pipeline has a transformer, not a UNet: it has no LDM single-file layout we write")
    if missing:
        raise BadFileError(f"the pipeline has no {', '.join(sorted(missing))}; an SD checkpoint needs all of them")
    if "text_encoder_2" in parts:
        return "sdxl"
    act = read_json_object(folder / "text_encoder" / "config.json").get("hidden_act")
    return "sd2" if act == "gelu" else "sd1"  # OpenCLIP-H uses gelu, OpenAI CLIP-L quick_gelu


def _unet_plan(folder: Path, dtype: torch.dtype | None) -> list[PlannedTensor]:
    layout = unet_names.layout_from_config(read_json_object(folder / "unet" / "config.json"))
    source = open_component(folder / "unet", "diffusion_pytorch_model")
    plan = []
    for key in source.shapes:
        name = unet_names.diffusers_to_ldm_module(key, layout)
        if name is None:
            raise BadFileError(f"unet tensor {key} has no place in an LDM UNet")
        plan.append(source.planned(key, unet_names.LDM_PREFIX + name, dtype))
    return plan


def _vae_plan(folder: Path, dtype: torch.dtype | None) -> list[PlannedTensor]:
    levels = len(read_json_object(folder / "vae" / "config.json")["down_block_types"])
    source = open_component(folder / "vae", "diffusion_pytorch_model")
    plan = []
    for key, shape in source.shapes.items():
        name = vae_names.diffusers_to_ldm_vae(key, levels)
        if name is None:
            raise BadFileError(f"vae tensor {key} has no place in an LDM autoencoder")
        full = vae_names.LDM_PREFIX + name
        if vae_names.is_attention_weight(name) and len(shape) == 2:
            plan.append(source.planned(key, full, dtype, (*shape, 1, 1), lambda t: t[:, :, None, None]))
        else:
            plan.append(source.planned(key, full, dtype))
    return plan


def _clip_plan(source: TensorSource, prefix: str, dtype: torch.dtype | None) -> list[PlannedTensor]:
    plan = []
    for key in source.shapes:
        name = strip_text_model(key)
        if name.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            plan.append(source.planned(key, f"{prefix}text_model.{name}", dtype))
        else:
            raise BadFileError(f"text-encoder tensor {key} has no place in an LDM CLIP-L text encoder")
    return plan


def _openclip_plan(source: TensorSource, prefix: str, dtype: torch.dtype | None) -> list[PlannedTensor]:
    plan = []
    fused: dict[str, dict[int, str]] = {}
    for key in source.shapes:
        if strip_text_model(key) == POSITION_IDS:
            continue
        mapped = hf_to_openclip(key)
        if mapped is None:
            raise BadFileError(f"text-encoder tensor {key} has no place in an OpenCLIP text encoder")
        name, slot = mapped
        if slot is not None:
            fused.setdefault(name, {})[slot] = key
        elif name == TRANSPOSED:
            plan.append(source.planned(key, prefix + name, dtype, tuple(reversed(source.shapes[key])), lambda t: t.t()))
        else:
            plan.append(source.planned(key, prefix + name, dtype))
    for name, slots in fused.items():
        if sorted(slots) != [0, 1, 2]:
            raise BadFileError(f"{name} needs q, k and v projections; the text encoder lacks some of them")
        q, k, v = (slots[i] for i in range(3))
        shape = (3 * source.shapes[q][0], *source.shapes[q][1:])

        def make(q: str = q, k: str = k, v: str = v) -> torch.Tensor:
            return fuse_in_proj(source.get(q), source.get(k), source.get(v))

        plan.append(PlannedTensor(prefix + name, shape, source.output_dtype(q, dtype), make))
    return plan


def prediction_warnings(folder: Path, base: str) -> list[str]:
    """LDM files do not record what the UNet predicts; say so when loaders will guess wrong for this base."""
    scheduler = folder / "scheduler" / "scheduler_config.json"
    predicted = read_json_object(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    assumed = "v_prediction" if base == "sd2" else "epsilon"
    if predicted == assumed:
        return []
    return [f"the scheduler says {predicted}, which LDM files cannot record; loaders guess {assumed} for {base}"]


def diffusers_to_ldm_plan(folder: Path, dtype: torch.dtype | None) -> tuple[str, list[PlannedTensor]]:
    """(base, planned tensors) of the single file equivalent to a diffusers pipeline folder."""
    base = diffusers_base(folder)
    plan = _unet_plan(folder, dtype) + _vae_plan(folder, dtype)
    for component, prefix in LDM_TEXT_ENCODERS[base].items():
        source = open_component(folder / component, "model")
        build = _openclip_plan if is_openclip_root(prefix) else _clip_plan
        plan += build(source, prefix, dtype)
    return base, plan
