"""Chroma transformer checkpoints: a BFL single file (lodestones' releases, ComfyUI's diffusion_models) or a file
of diffusers-named tensors <-> a diffusers `ChromaTransformer2DModel` folder, any size, config from shapes; and
where each LoRA target lives in any of them. The BFL layout is Flux.1's without modulations, plus the
approximator (diffusers' own converter, `convert_chroma_transformer_checkpoint_to_diffusers`, is the reference).
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.layout_checkpoint import (
    LayoutTensor,
    diffusers_file_targets,
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
from adapterzoo.formats.families.chroma.modules import (
    APPROXIMATOR,
    BASE,
    CHROMA_CLASS,
    CONFIG,
    architecture_from_table,
    module_table,
)
from adapterzoo.formats.families.chroma.probe import checkpoint_prefix
from adapterzoo.formats.families.flux.checkpoint import bfl_norm_tensors
from adapterzoo.formats.families.flux.modules import FluxArchitecture, axes_dims_rope
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, plan_dtype
from adapterzoo.formats.io.tensor_source import TensorSource, open_component
from adapterzoo.formats.model.module_tables import saved_config
from adapterzoo.formats.model.targets import TRANSFORMER
from adapterzoo.formats.model.weight_locations import WEIGHT_STEMS, CheckpointTargets

TITLE = "Chroma"
BFL_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
# (BFL name, diffusers name) of the tensors whose shapes give the config
_NAMES = {"embed": ("img_in.weight", "x_embedder.weight"), "context": ("txt_in.weight", "context_embedder.weight"),
          "norm": (BFL_MARKER, "transformer_blocks.0.attn.norm_k.weight"),
          "final": ("final_layer.linear.weight", "proj_out.weight"), "double": ("double_blocks.", "transformer_blocks."),
          "single": ("single_blocks.", "single_transformer_blocks."), "layers": ("in_layer", "linear_1")}


def _count(bare: dict, root: str) -> int:
    return len({k[len(root):].split(".")[0] for k in bare if k.startswith(root)})


def config_from_shapes(bare: dict[str, tuple[int, ...]]) -> dict:
    """The ChromaTransformer2DModel config of a transformer whose tensors (BFL or diffusers names) have these shapes."""
    names = {key: pair[0 if BFL_MARKER in bare else 1] for key, pair in _NAMES.items()}
    try:
        hidden, in_channels = bare[names["embed"]]
        head = bare[names["norm"]][0]
        approximator, channels = bare[f"{APPROXIMATOR}.in_proj.weight"]
        config = {**CONFIG, "in_channels": in_channels, "num_layers": _count(bare, names["double"]),
                  "num_single_layers": _count(bare, names["single"]), "attention_head_dim": head,
                  "num_attention_heads": hidden // head, "joint_attention_dim": bare[names["context"]][1],
                  "axes_dims_rope": axes_dims_rope(head), "approximator_num_channels": channels,
                  "approximator_hidden_dim": approximator,
                  "approximator_layers": _count(bare, f"{APPROXIMATOR}.layers.")}
        out_channels = bare[names["final"]][0]
    except KeyError as missing:
        raise BadFileError(f"not a whole Chroma transformer: no {missing.args[0]}") from None
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    return config


def bfl_tensors(config: dict) -> list[LayoutTensor]:
    """Every tensor of the BFL single file of a ChromaTransformer2DModel with this config."""
    architecture = architecture_from_table(module_table(config))
    hidden = config["approximator_hidden_dim"]
    norms = [renamed(f"{APPROXIMATOR}.norms.{n}.scale", f"{APPROXIMATOR}.norms.{n}.weight", hidden)
             for n in range(config["approximator_layers"])]
    return layout_tensors(architecture.bfl) + bfl_norm_tensors(config) + norms


def _bare(source: TensorSource) -> tuple[str, dict[str, tuple[int, ...]]]:
    prefix = checkpoint_prefix(source.shapes)
    if prefix is None:
        raise BadFileError(f"no Chroma transformer ({APPROXIMATOR}.in_proj) in the file")
    return prefix, {k[len(prefix):]: v for k, v in source.shapes.items() if k.startswith(prefix)}


def to_folder(source: TensorSource, dtype: torch.dtype | None, folder: Path) -> dict:
    """A Chroma single file as a diffusers transformer folder."""
    prefix, bare = _bare(source)
    config = config_from_shapes(bare)
    if BFL_MARKER in bare:
        plan, dropped = to_diffusers_plan(source, prefix, bfl_tensors(config), dtype)
    else:
        plan, dropped = [source.planned(prefix + k, k, dtype) for k in bare], len(source.shapes) - len(bare)
    plan = fit(CHROMA_CLASS, config, plan, TITLE)
    written = write_model_folder(folder, CHROMA_CLASS, config, plan)
    return {"base": BASE, "tensors": written, "dtype": plan_dtype(plan), "dropped": dropped, "warnings": []}


def _folder_config(transformer: Path) -> dict:
    """A saved config without the fields old Chroma folders carry that the class does not take (guidance_embeds)."""
    config = saved_config(read_json_object(transformer / "config.json"))
    return {**CONFIG, **{k: v for k, v in config.items() if k in CONFIG}}


def to_single_file(folder: Path, dtype: torch.dtype | None) -> tuple[str, list[PlannedTensor], list[str]]:
    """A diffusers Chroma transformer (or pipeline) folder as a BFL single file, bare names."""
    transformer = model_folder(folder, CHROMA_CLASS)
    if transformer is None:
        raise BadFileError(f"{folder.name} holds no {CHROMA_CLASS}")
    config = _folder_config(transformer)
    source = open_component(transformer, WEIGHT_STEMS[TRANSFORMER])
    fit(CHROMA_CLASS, config, [source.planned(k, k, None) for k in source.shapes], TITLE)
    return BASE, to_layout_plan(source, bfl_tensors(config), dtype), []


def chroma_targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    """A diffusers Chroma transformer or pipeline folder, or a single file (`source`, opened); None for any other."""
    if source is None:
        transformer = model_folder(path, CHROMA_CLASS)
        if transformer is None:
            return None
        return folder_targets(path, BASE, architecture_from_table(module_table(_folder_config(transformer))))
    prefix = checkpoint_prefix(source.shapes)
    if prefix is None:
        return None
    _, bare = _bare(source)
    architecture: FluxArchitecture = architecture_from_table(module_table(config_from_shapes(bare)))
    if BFL_MARKER in bare:
        return layout_file_targets(path, BASE, architecture, source, prefix, architecture.bfl)
    return diffusers_file_targets(path, BASE, architecture, source, prefix)
