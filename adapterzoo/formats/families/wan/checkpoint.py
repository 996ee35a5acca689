"""Wan transformer checkpoints (`LAYOUT`): Wan-AI's original and ComfyUI's diffusion_models files (Wan's names,
bare or under `model.diffusion_model.`) or a file of diffusers-named tensors <-> a diffusers `WanTransformer3DModel`
folder, any size, config from shapes; and where each LoRA target lives in any of them. Every tensor is one
diffusers tensor renamed (`modules.RENAMES`); reference: diffusers' `convert_wan_transformer_to_diffusers`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.layout_checkpoint import LayoutTensor, SingleFileLayout, renamed
from adapterzoo.formats.families.wan.modules import (
    BASE,
    COMMON,
    HEAD_DIM,
    WAN_CLASS,
    architecture_from_table,
    diffusers_name,
    module_table,
    original_modules,
    wan_name,
)
from adapterzoo.formats.families.wan.probe import WAN_MARKER, checkpoint_prefix
from adapterzoo.formats.model.layouts import block_count

if TYPE_CHECKING:
    from adapterzoo.formats.io.tensor_source import TensorSource
    from adapterzoo.formats.model.weight_locations import CheckpointTargets

TITLE = "Wan"
E = "condition_embedder."


def config_from_shapes(bare: dict[str, tuple[int, ...]]) -> dict:
    """The WanTransformer3DModel config of a transformer whose tensors (either naming, no prefix) have these
    shapes. The head count is not in the weights: Wan's head dim 128 is assumed where the width allows."""
    d = {diffusers_name(k): v for k, v in bare.items()}
    try:
        width, in_channels, *patch = d["patch_embedding.weight"]
        config = {**COMMON, "in_channels": in_channels, "patch_size": patch,
                  "out_channels": d["proj_out.weight"][0] // math.prod(patch),
                  "freq_dim": d[f"{E}time_embedder.linear_1.weight"][1],
                  "text_dim": d[f"{E}text_embedder.linear_1.weight"][1],
                  "ffn_dim": d["blocks.0.ffn.net.0.proj.weight"][0], "num_layers": block_count(d, "blocks."),
                  "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in d else None,
                  "cross_attn_norm": "blocks.0.norm2.weight" in d}
    except (KeyError, ValueError) as missing:
        raise BadFileError(f"not a whole Wan transformer: no {missing.args[0]}") from None
    head = HEAD_DIM if width % HEAD_DIM == 0 else width
    config |= {"attention_head_dim": head, "num_attention_heads": width // head}
    if (image := d.get(f"{E}image_embedder.ff.net.0.proj.weight")) is not None:
        config["image_dim"] = image[1]
    if (added := d.get("blocks.0.attn2.add_k_proj.weight")) is not None:
        config["added_kv_proj_dim"] = added[1]
    if (pos := d.get(f"{E}image_embedder.pos_embed")) is not None:
        config["pos_embed_seq_len"] = pos[1]
    return config


def wan_tensors(config: dict, shapes: dict[str, tuple[int, ...]], wan_names: bool) -> list[LayoutTensor]:
    """Every tensor of `shapes` (Wan's names if `wan_names`, else diffusers') under Wan's name, made of its
    diffusers tensor whole."""
    out = []
    for key, shape in shapes.items():
        wan, ours = (key, diffusers_name(key)) if wan_names else (wan_name(key), key)
        out.append(renamed(wan, ours, shape[0] if shape else 1))
    return out


def _warnings(config: dict) -> list[str]:
    if config["attention_head_dim"] == HEAD_DIM:
        return []
    return [f"width {config['attention_head_dim']} is no multiple of Wan's head dim {HEAD_DIM}: written as one "
            "head (the weights do not record the head count); edit config.json if the model has others"]


LAYOUT = SingleFileLayout(BASE, TITLE, WAN_CLASS, WAN_MARKER, checkpoint_prefix, config_from_shapes, wan_tensors,
                          lambda architecture: original_modules(architecture.targets),
                          lambda config: architecture_from_table(module_table(config)), warnings=_warnings)


def targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    """`LAYOUT.targets`, refusing a Wan 2.2 A14B pipeline folder: it holds two experts (`transformer` the high-noise
    one, `transformer_2` the low-noise one) and a LoRA is trained for one of them."""
    if source is None and (path / "transformer_2" / "config.json").is_file() and LAYOUT.owns_folder(path):
        raise BadFileError(f"{path.name} is a Wan 2.2 pipeline with two experts (transformer: high-noise, "
                           "transformer_2: low-noise); name the expert's folder, e.g. "
                           f"{path.name}/transformer or {path.name}/transformer_2")
    return LAYOUT.targets(path, source)
