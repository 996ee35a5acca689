"""Flux.2 transformer checkpoints: a BFL single file (BFL's release, ComfyUI's diffusion_models, with or without
`model.diffusion_model.`) or a file of diffusers-named tensors <-> a diffusers `Flux2Transformer2DModel` folder,
any size, with the config read from the shapes; and where each LoRA target lives in any of them.
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
    to_diffusers_plan,
    to_layout_plan,
    write_model_folder,
)
from adapterzoo.formats.families.flux.checkpoint import bfl_norm_tensors
from adapterzoo.formats.families.flux.modules import FluxArchitecture
from adapterzoo.formats.families.flux2.modules import (
    BASE,
    CONFIGS,
    DEV,
    FLUX2_CLASS,
    architecture_from_table,
    module_table,
)
from adapterzoo.formats.families.flux2.probe import MARKERS, block_count, checkpoint_prefix, variant_of
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, plan_dtype
from adapterzoo.formats.io.tensor_source import TensorSource, open_component
from adapterzoo.formats.model.module_tables import saved_config
from adapterzoo.formats.model.targets import TRANSFORMER
from adapterzoo.formats.model.weight_locations import WEIGHT_STEMS, CheckpointTargets

TITLE = "Flux.2"
HEAD_DIM = CONFIGS[DEV]["attention_head_dim"]
# (BFL name, diffusers name) of the tensors whose shapes give the config
_NAMES = {"embed": ("img_in.weight", "x_embedder.weight"), "context": ("txt_in.weight", "context_embedder.weight"),
          "time": ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
          "guidance": ("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"),
          "norm": ("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight"),
          "mlp": ("double_blocks.0.img_mlp.0.weight", "transformer_blocks.0.ff.linear_in.weight"),
          "final": ("final_layer.linear.weight", "proj_out.weight"),
          "double": ("double_blocks.", "transformer_blocks."), "single": ("single_blocks.", "single_transformer_blocks.")}


def axes_dims_rope(head_dim: int) -> list[int]:
    """Flux.2's four rope axes of 32 for head dim 128; otherwise four even quarters (no weight records them)."""
    if head_dim % 8:
        raise BadFileError(f"attention head dim {head_dim} cannot be split into Flux.2's four even rope axes")
    return [head_dim // 4] * 4


def config_from_shapes(bare: dict[str, tuple[int, ...]]) -> dict:
    """The Flux2Transformer2DModel config of a transformer whose tensors (BFL or diffusers names, no prefix) have
    these shapes."""
    column = 0 if MARKERS[0] in bare else 1
    names = {key: pair[column] for key, pair in _NAMES.items()}
    try:
        hidden, in_channels = bare[names["embed"]]
        head = bare[names["norm"]][0]
        config = {**CONFIGS[DEV], "in_channels": in_channels, "num_layers": block_count(bare, names["double"]),
                  "num_single_layers": block_count(bare, names["single"]), "attention_head_dim": head,
                  "num_attention_heads": hidden // head, "joint_attention_dim": bare[names["context"]][1],
                  "timestep_guidance_channels": bare[names["time"]][1],
                  "mlp_ratio": bare[names["mlp"]][0] / (2 * hidden), "axes_dims_rope": axes_dims_rope(head),
                  "guidance_embeds": names["guidance"] in bare}
        out_channels = bare[names["final"]][0]
    except KeyError as missing:
        raise BadFileError(f"not a whole Flux.2 transformer: no {missing.args[0]}") from None
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    return config


def bfl_tensors(config: dict) -> list[LayoutTensor]:
    """Every tensor of the BFL single file of a Flux2Transformer2DModel with this config."""
    architecture = architecture_from_table(module_table(config))
    return layout_tensors(architecture.bfl, ("weight",)) + bfl_norm_tensors(config)  # norms named as in Flux.1


def _bare(source: TensorSource) -> tuple[str, dict[str, tuple[int, ...]]]:
    prefix = checkpoint_prefix(source.shapes)
    if prefix is None:
        raise BadFileError(f"no Flux.2 transformer ({MARKERS[0]}) in the file")
    return prefix, {k[len(prefix):]: v for k, v in source.shapes.items() if k.startswith(prefix)}


def to_diffusers(source: TensorSource, dtype: torch.dtype | None) -> tuple[dict, list[PlannedTensor], int]:
    """(config, the diffusers transformer's tensors, source tensors left out) of a Flux.2 single file."""
    prefix, bare = _bare(source)
    config = config_from_shapes(bare)
    if MARKERS[0] in bare:
        plan, dropped = to_diffusers_plan(source, prefix, bfl_tensors(config), dtype)
    else:
        plan = [source.planned(prefix + k, k, dtype) for k in bare]
        dropped = len(source.shapes) - len(plan)
    return config, fit(FLUX2_CLASS, config, plan, TITLE), dropped


def to_folder(source: TensorSource, dtype: torch.dtype | None, folder: Path) -> dict:
    """A Flux.2 single file as a diffusers transformer folder."""
    config, plan, dropped = to_diffusers(source, dtype)
    written = write_model_folder(folder, FLUX2_CLASS, config, plan)
    warnings = []
    if config["attention_head_dim"] != HEAD_DIM:
        warnings.append(f"head dim {config['attention_head_dim']}: rope axes set to {config['axes_dims_rope']} "
                        "(the weights do not record them); edit config.json if the model was trained with others")
    return {"base": BASE, "tensors": written, "dtype": plan_dtype(plan), "dropped": dropped, "warnings": warnings}


def to_single_file(folder: Path, dtype: torch.dtype | None) -> tuple[str, list[PlannedTensor], list[str]]:
    """A diffusers Flux.2 transformer (or pipeline) folder as BFL's single file, bare names as BFL releases it."""
    transformer = model_folder(folder, FLUX2_CLASS)
    if transformer is None:
        raise BadFileError(f"{folder.name} holds no {FLUX2_CLASS}")
    config = saved_config(read_json_object(transformer / "config.json"))
    source = open_component(transformer, WEIGHT_STEMS[TRANSFORMER])
    fit(FLUX2_CLASS, config, [source.planned(k, k, None) for k in source.shapes], TITLE)
    return BASE, to_layout_plan(source, bfl_tensors(config), dtype), []


def _architecture(config: dict) -> FluxArchitecture:
    variant = variant_of(config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"] - 1,
                         config["num_single_layers"] - 1)
    return architecture_from_table(module_table(config), variant)


def flux2_targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    """A diffusers Flux.2 transformer or pipeline folder, or a single file (`source`, opened); None for any other."""
    if source is None:
        transformer = model_folder(path, FLUX2_CLASS)
        if transformer is None:
            return None
        architecture = _architecture(saved_config(read_json_object(transformer / "config.json")))
        return folder_targets(path, BASE, architecture)
    prefix = checkpoint_prefix(source.shapes)
    if prefix is None:
        return None
    _, bare = _bare(source)
    architecture = _architecture(config_from_shapes(bare))
    if MARKERS[0] in bare:
        return layout_file_targets(path, BASE, architecture, source, prefix, architecture.bfl)
    return diffusers_file_targets(path, BASE, architecture, source, prefix)
