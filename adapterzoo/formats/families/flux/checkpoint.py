"""Flux.1 transformer checkpoints: a BFL single file <-> a diffusers `FluxTransformer2DModel` folder, any size.

Every BFL tensor is listed with the diffusers tensors its rows make (FLUX.md §1.2-1.4): qkv and linear1
are row blocks of q, k, v (and the MLP input), the final modulation has its two halves swapped, the rest
are renamed. The list is built from the module table of the config, which a single file's shapes give
offline, so widths diffusers' own single-file loader refuses convert too. Plans stream one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.families.flux.modules import (
    FLUX_CLASS,
    bfl_config_from_shapes,
    flux_architecture_from_tables,
    flux_checkpoint_architecture,
    saved_config,
)
from adapterzoo.formats.families.flux.probe import BASE, KEY_NORM, bfl_prefix
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, plan_dtype, write_safetensors
from adapterzoo.formats.io.tensor_source import TensorSource, open_component
from adapterzoo.formats.model.module_tables import build_on_meta, module_table
from adapterzoo.formats.model.targets import TRANSFORMER, Rows
from adapterzoo.formats.model.weight_locations import (
    SINGLE_FILE,
    WEIGHT_STEMS,
    CheckpointTargets,
    WeightLocation,
    checked,
    diffusers_locations,
)

WEIGHTS = "diffusion_pytorch_model"
FLUX_HEAD_DIM = 128


@dataclass(frozen=True)
class BflTensor:
    """One tensor of a BFL file and the diffusers tensors made of its rows, each with the rows it takes."""

    name: str
    parts: tuple[tuple[str, Rows], ...]


def _norm_names(config: dict) -> list[BflTensor]:
    """RMSNorm scales of the attention (FLUX.md §1.2), one [head_dim] vector each."""
    out = []
    pairs = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
             "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
    whole = ((0, config["attention_head_dim"]),)
    for n in range(config["num_layers"]):
        out += [BflTensor(f"double_blocks.{n}.{bfl}.scale", ((f"transformer_blocks.{n}.{ours}.weight", whole),))
                for bfl, ours in pairs.items()]
    for n in range(config["num_single_layers"]):
        out += [BflTensor(f"single_blocks.{n}.norm.{q}_norm.scale",
                          ((f"single_transformer_blocks.{n}.attn.norm_{q[0]}.weight", whole),))
                for q in ("query", "key")]
    return out


def bfl_tensors(config: dict) -> list[BflTensor]:
    """Every tensor of the BFL checkpoint of a FluxTransformer2DModel with this config."""
    architecture = flux_architecture_from_tables({TRANSFORMER: module_table(FLUX_CLASS, config)})
    out = []
    for module in architecture.bfl:
        for leaf in ("weight", "bias"):
            parts = tuple((f"{path.removeprefix(TRANSFORMER + '.')}.{leaf}", rows) for path, rows in module.parts)
            out.append(BflTensor(f"{module.name}.{leaf}", parts))
    return out + _norm_names(config)


def _cut(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    return torch.cat([tensor[lo:hi] for lo, hi in rows]) if len(rows) > 1 else tensor[rows[0][0]:rows[0][1]]


def _whole(rows: Rows, total: int) -> bool:
    return rows == ((0, total),)


def _fit(config: dict, plan: list[PlannedTensor]) -> list[PlannedTensor]:
    """The plan in the model's key order, refused unless it has exactly the model's tensors and shapes."""
    expected = {k: tuple(v.shape) for k, v in build_on_meta(FLUX_CLASS, config).state_dict().items()}
    by_name = {p.name: p for p in plan}
    missing = [k for k in expected if k not in by_name]
    surplus = [k for k in by_name if k not in expected]
    wrong = [f"{k} {list(p.shape)}, model {list(expected[k])}" for k, p in by_name.items()
             if k in expected and p.shape != expected[k]]
    if missing or surplus or wrong:
        said = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
                f"{len(wrong)} mis-shaped (e.g. {wrong[0]})" if wrong else f"{len(surplus)} unexpected (e.g. {surplus[0]})")
        raise BadFileError(f"the Flux transformer config inferred from the weights does not fit them: {said}")
    return [by_name[k] for k in expected]


def bfl_config(source: TensorSource) -> tuple[str, dict]:
    """(key prefix, FluxTransformer2DModel config) of a BFL single file, from its shapes."""
    prefix = bfl_prefix(source.shapes)
    if prefix is None:
        raise BadFileError(f"no Flux.1 transformer ({KEY_NORM}) in the file")
    return prefix, bfl_config_from_shapes({k[len(prefix):]: v for k, v in source.shapes.items() if k.startswith(prefix)})


def bfl_to_diffusers_plan(source: TensorSource, dtype: torch.dtype | None) -> tuple[dict, list[PlannedTensor], int]:
    """(config, the diffusers transformer's tensors, source tensors left out: VAE/text encoders of a full file)."""
    prefix, config = bfl_config(source)
    plan, used = [], set()
    for tensor in bfl_tensors(config):
        key = prefix + tensor.name
        if key not in source.shapes:
            continue  # _fit names what is missing
        used.add(key)
        stored = source.shapes[key]
        for name, rows in tensor.parts:
            if len(rows) == 1:  # a row block (q, k, v, the MLP input) or the whole tensor
                plan.append(source.planned_rows(key, name, dtype, *rows[0]))
                continue
            shape = (sum(hi - lo for lo, hi in rows), *stored[1:])
            plan.append(source.planned(key, name, dtype, shape, lambda t, rows=rows: _cut(t, rows)))
    return config, _fit(config, plan), len(source.shapes) - len(used)


def flux_transformer_folder(folder: Path) -> Path | None:
    """The folder holding a FluxTransformer2DModel's config and weights: `folder` itself or its `transformer/`."""
    for candidate in (folder, folder / TRANSFORMER):
        config = candidate / "config.json"
        if config.is_file() and read_json_object(config).get("_class_name") == FLUX_CLASS:
            return candidate
    return None


def diffusers_to_bfl_plan(folder: Path, dtype: torch.dtype | None) -> list[PlannedTensor]:
    """The BFL single file's tensors (bare names, as BFL releases them) of a diffusers Flux transformer folder."""
    config = saved_config(read_json_object(folder / "config.json"))
    source = open_component(folder, WEIGHTS)
    _fit(config, [source.planned(k, k, None) for k in source.shapes])
    plan = []
    for tensor in bfl_tensors(config):
        if len(tensor.parts) == 1 and _whole(tensor.parts[0][1], source.shapes[tensor.parts[0][0]][0]):
            plan.append(source.planned(tensor.parts[0][0], tensor.name, dtype))
            continue
        first = tensor.parts[0][0]
        rows = sum(hi - lo for _, part_rows in tensor.parts for lo, hi in part_rows)
        shape = (rows, *source.shapes[first][1:])
        plan.append(PlannedTensor(tensor.name, shape, source.output_dtype(first, dtype),
                                  lambda tensor=tensor, shape=shape: _assemble(tensor, shape, source)))
    return plan


def _assemble(tensor: BflTensor, shape: tuple[int, ...], source: TensorSource) -> torch.Tensor:
    """The BFL tensor from its diffusers parts, each part's rows put back where they came from."""
    first = source.get(tensor.parts[0][0])
    out = torch.empty(shape, dtype=first.dtype)
    for name, rows in tensor.parts:
        part = first if name == tensor.parts[0][0] else source.get(name)
        offset = 0
        for lo, hi in rows:
            out[lo:hi] = part[offset:offset + hi - lo]
            offset += hi - lo
    return out


def write_flux_folder(folder: Path, config: dict, plan: list[PlannedTensor]) -> int:
    """A bare transformer folder (config.json + weights), as `FluxTransformer2DModel.from_pretrained` reads it."""
    build_on_meta(FLUX_CLASS, config).save_config(folder)
    return write_safetensors(folder / f"{WEIGHTS}.safetensors", plan, {"format": "pt"})


def to_folder(source: TensorSource, dtype: torch.dtype | None, folder: Path) -> dict:
    """A BFL single file as a diffusers transformer folder; the rope axes are in no weight, so a head dim other
    than Flux.1's own gets a warning."""
    config, plan, dropped = bfl_to_diffusers_plan(source, dtype)
    written = write_flux_folder(folder, config, plan)
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
    if source is None:
        return _folder_targets(path) if flux_transformer_folder(path) is not None else None
    return _bfl_targets(path, source) if bfl_prefix(source.shapes) is not None else None


def _folder_targets(path: Path) -> CheckpointTargets:
    """A diffusers Flux transformer folder, or a pipeline folder (transformer, and CLIP/T5 when present)."""
    architecture = flux_checkpoint_architecture(path)
    if architecture is None:
        raise BadFileError(f"{path.name} is not a Flux model folder")
    if (path / "config.json").is_file():  # the transformer alone: its weights live in the folder itself
        source = open_component(path, WEIGHT_STEMS[TRANSFORMER])
        locations = diffusers_locations(architecture, {TRANSFORMER: source}, SINGLE_FILE)
        return CheckpointTargets(path, BASE, True, architecture, locations, {SINGLE_FILE: source})
    components = {target.component for target in architecture.targets.values()}
    sources = {c: open_component(path / c, WEIGHT_STEMS[c]) for c in components}
    return CheckpointTargets(path, BASE, True, architecture, diffusers_locations(architecture, sources), sources)


def _bfl_targets(path: Path, source: TensorSource) -> CheckpointTargets:
    """A BFL single file: each target is its BFL weight, a row block of a fused one (qkv, linear1), or the
    final modulation with its halves swapped (FLUX.md §1.2-1.3)."""
    architecture = flux_checkpoint_architecture(path)
    if architecture is None:
        raise BadFileError(f"{path.name} is a Flux checkpoint this cannot read (not safetensors)")
    prefix = bfl_prefix(source.shapes)
    locations = {}
    for module in architecture.bfl:
        weight, bias = f"{prefix}{module.name}.weight", f"{prefix}{module.name}.bias"
        if weight not in source.shapes:
            continue
        bias_key = bias if bias in source.shapes else None
        for target, rows in module.parts:
            if len(rows) == 2:  # the two halves, swapped
                location = WeightLocation(SINGLE_FILE, weight, bias_key, halves_swapped=True)
            else:
                whole = rows[0] == (0, module.shape[0])
                location = WeightLocation(SINGLE_FILE, weight, bias_key, None if whole else rows[0])
            locations[target] = checked(location, source, architecture.targets[target].shape)
    return CheckpointTargets(path, BASE, False, architecture, locations, {SINGLE_FILE: source})
