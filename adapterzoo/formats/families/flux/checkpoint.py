"""Flux.1 transformer checkpoints: a BFL single file <-> a diffusers `FluxTransformer2DModel` folder, any size.

Every BFL tensor is listed with the diffusers tensors its rows make (FLUX.md §1.2-1.4): qkv and linear1
are row blocks of q, k, v (and the MLP input), the final modulation has its two halves swapped, the rest
are renamed. The list is built from the module table of the config, which a single file's shapes give
offline, so widths diffusers' own single-file loader refuses convert too (`checkpoint.layout_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.layout_checkpoint import (
    LayoutTensor,
    fit,
    folder_targets,
    layout_file_targets,
    layout_tensors,
    model_folder,
    renamed,
    to_diffusers_plan,
    to_layout_plan,
    write_model_folder,
)
from adapterzoo.formats.families.flux.modules import (
    FLUX_CLASS,
    bfl_config_from_shapes,
    flux_architecture_from_tables,
    flux_checkpoint_architecture,
)
from adapterzoo.formats.families.flux.probe import BASE, KEY_NORM, bfl_prefix
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, plan_dtype
from adapterzoo.formats.io.tensor_source import TensorSource, open_component
from adapterzoo.formats.model.module_tables import module_table, saved_config
from adapterzoo.formats.model.targets import TRANSFORMER
from adapterzoo.formats.model.weight_locations import WEIGHT_STEMS, CheckpointTargets

FLUX_HEAD_DIM = 128
TITLE = "Flux"


def bfl_norm_tensors(config: dict) -> list[LayoutTensor]:
    """RMSNorm scales of the attention (FLUX.md §1.2), one [head_dim] vector each."""
    out = []
    pairs = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
             "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
    head = config["attention_head_dim"]
    for n in range(config["num_layers"]):
        out += [renamed(f"double_blocks.{n}.{bfl}.scale", f"transformer_blocks.{n}.{ours}.weight", head)
                for bfl, ours in pairs.items()]
    for n in range(config["num_single_layers"]):
        out += [renamed(f"single_blocks.{n}.norm.{q}_norm.scale", f"single_transformer_blocks.{n}.attn.norm_{q[0]}.weight",
                        head) for q in ("query", "key")]
    return out


def bfl_tensors(config: dict) -> list[LayoutTensor]:
    """Every tensor of the BFL checkpoint of a FluxTransformer2DModel with this config."""
    architecture = flux_architecture_from_tables({TRANSFORMER: module_table(FLUX_CLASS, config)})
    return layout_tensors(architecture.bfl) + bfl_norm_tensors(config)


def bfl_config(source: TensorSource) -> tuple[str, dict]:
    """(key prefix, FluxTransformer2DModel config) of a BFL single file, from its shapes."""
    prefix = bfl_prefix(source.shapes)
    if prefix is None:
        raise BadFileError(f"no Flux.1 transformer ({KEY_NORM}) in the file")
    return prefix, bfl_config_from_shapes({k[len(prefix):]: v for k, v in source.shapes.items() if k.startswith(prefix)})


def bfl_to_diffusers_plan(source: TensorSource, dtype: torch.dtype | None) -> tuple[dict, list[PlannedTensor], int]:
    """(config, the diffusers transformer's tensors, source tensors left out: VAE/text encoders of a full file)."""
    prefix, config = bfl_config(source)
    plan, dropped = to_diffusers_plan(source, prefix, bfl_tensors(config), dtype)
    return config, fit(FLUX_CLASS, config, plan, TITLE), dropped


def flux_transformer_folder(folder: Path) -> Path | None:
    """The folder holding a FluxTransformer2DModel's config and weights: `folder` itself or its `transformer/`."""
    return model_folder(folder, FLUX_CLASS)


def diffusers_to_bfl_plan(folder: Path, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """The BFL single file's tensors (bare names, as BFL releases them) of a diffusers Flux transformer folder."""
    config = saved_config(read_json_object(folder / "config.json"))
    source = open_component(folder, WEIGHT_STEMS[TRANSFORMER])
    fit(FLUX_CLASS, config, [source.planned(k, k, None) for k in source.shapes], TITLE)
    return to_layout_plan(source, bfl_tensors(config), dtype)


def to_folder(source: TensorSource, dtype: torch.dtype | None, folder: Path) -> dict:
    """A BFL single file as a diffusers transformer folder; the rope axes are in no weight, so a head dim other
    than Flux.1's own gets a warning."""
    config, plan, dropped = bfl_to_diffusers_plan(source, dtype)
    written = write_model_folder(folder, FLUX_CLASS, config, plan)
    warnings = []
    if config["attention_head_dim"] != FLUX_HEAD_DIM:
        warnings.append(f"head dim {config['attention_head_dim']}: rope axes set to {config['axes_dims_rope']} "
                        "(the weights do not record them); edit config.json if the model was trained with others")
    return {"base": BASE, "tensors": written, "dtype": plan_dtype(plan), "dropped": dropped, "warnings": warnings}


def to_single_file(folder: Path, dtype: torch.dtype | None) -> tuple[str, list[PlannedTensor], list[str]]:
    transformer = flux_transformer_folder(folder)
    if transformer is None:
        raise BadFileError(f"{folder.name} holds no {FLUX_CLASS}")
    return BASE, diffusers_to_bfl_plan(transformer, dtype), []


# -- where LoRA targets live (merge, extract) ------------------------------------------------------------


def flux_targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    """A diffusers Flux transformer or pipeline folder, or a BFL single file (`source`, opened); None for any
    other model."""
    if source is None and flux_transformer_folder(path) is None:
        return None
    if source is not None and bfl_prefix(source.shapes) is None:
        return None
    architecture = flux_checkpoint_architecture(path)
    if architecture is None:
        raise BadFileError(f"{path.name} is a Flux checkpoint this cannot read (not safetensors)")
    if source is None:
        return folder_targets(path, BASE, architecture)
    return layout_file_targets(path, BASE, architecture, source, bfl_prefix(source.shapes), architecture.bfl)
