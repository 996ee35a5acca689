"""A transformer's single file in its family's own layout (BFL, ComfyUI) <-> a diffusers model folder, and where
each LoRA target's weight lives in either: one engine for every family whose single files rename, fuse or
half-swap diffusers' tensors.

A family lists each tensor of its single file with the diffusers tensors made of its rows (`LayoutTensor`),
built from its layout's `FusedModule`s plus whatever it stores besides (norm scales). Plans stream one tensor
at a time; a row block kept as stored is copied as bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, plan_dtype, planned_tensor, write_safetensors
from adapterzoo.formats.io.tensor_source import TensorSource, open_component
from adapterzoo.formats.model.module_tables import build_on_meta, saved_config
from adapterzoo.formats.model.on_meta import parameters_on_meta
from adapterzoo.formats.model.targets import TRANSFORMER, Architecture, FusedModule, Rows
from adapterzoo.formats.model.weight_locations import (
    SINGLE_FILE,
    WEIGHT_STEMS,
    CheckpointTargets,
    WeightLocation,
    checked,
    diffusers_locations,
)

WEIGHTS = WEIGHT_STEMS[TRANSFORMER]


@dataclass(frozen=True)
class LayoutTensor:
    """One tensor of a single file and the diffusers tensors made of its rows, each with the rows it takes."""

    name: str
    parts: tuple[tuple[str, Rows], ...]


def layout_tensors(layout: Sequence[FusedModule], leaves: Sequence[str] = ("weight", "bias")) -> list[LayoutTensor]:
    """The weight and bias of every layout Linear, named as diffusers names its parts' tensors."""
    out = []
    for module in layout:
        for leaf in leaves:
            parts = tuple((f"{path.removeprefix(TRANSFORMER + '.')}.{leaf}", rows) for path, rows in module.parts)
            out.append(LayoutTensor(f"{module.name}.{leaf}", parts))
    return out


def renamed(name: str, diffusers: str, rows: int) -> LayoutTensor:
    """A tensor stored whole under another name (a norm's scale)."""
    return LayoutTensor(name, ((diffusers, ((0, rows),)),))


def _cut(tensor: torch.Tensor, rows: Rows) -> torch.Tensor:
    return torch.cat([tensor[lo:hi] for lo, hi in rows]) if len(rows) > 1 else tensor[rows[0][0]:rows[0][1]]


def fit(model_class: str, config: dict, plan: list[PlannedTensor], title: str) -> list[PlannedTensor]:
    """The plan in the model's key order, refused unless it has exactly the model's tensors and shapes."""
    expected = {k: tuple(v.shape) for k, v in build_on_meta(model_class, config).state_dict().items()}
    by_name = {p.name: p for p in plan}
    missing = [k for k in expected if k not in by_name]
    surplus = [k for k in by_name if k not in expected]
    wrong = [f"{k} {list(p.shape)}, model {list(expected[k])}" for k, p in by_name.items()
             if k in expected and p.shape != expected[k]]
    if missing or surplus or wrong:
        said = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else
                f"{len(wrong)} mis-shaped (e.g. {wrong[0]})" if wrong else f"{len(surplus)} unexpected (e.g. {surplus[0]})")
        raise BadFileError(f"the {title} transformer config inferred from the weights does not fit them: {said}")
    return [by_name[k] for k in expected]


def to_diffusers_plan(source: TensorSource, prefix: str, tensors: list[LayoutTensor], dtype: torch.dtype | None
                      ) -> tuple[list[PlannedTensor], int]:
    """The diffusers tensors a single file's layout tensors (keys under `prefix`) make, and how many of the
    file's tensors no layout tensor names (a full file's VAE or text encoders). Check the plan with `fit`."""
    plan, used = [], set()
    for tensor in tensors:
        key = prefix + tensor.name
        if key not in source.shapes:
            continue  # fit names what is missing
        used.add(key)
        stored = source.shapes[key]
        for name, rows in tensor.parts:
            if len(rows) == 1:  # a row block (q, k, v, the MLP input) or the whole tensor
                plan.append(source.planned_rows(key, name, dtype, *rows[0]))
                continue
            shape = (sum(hi - lo for lo, hi in rows), *stored[1:])
            plan.append(source.planned(key, name, dtype, shape, lambda t, rows=rows: _cut(t, rows)))
    return plan, len(source.shapes) - len(used)


def to_layout_plan(source: TensorSource, tensors: list[LayoutTensor], dtype: torch.dtype | None
                   ) -> list[PlannedTensor]:
    """The single file's tensors (bare layout names) made from a diffusers model's tensors; each tensor whose
    parts are all stored is planned (biases a model lacks are left out)."""
    plan = []
    for tensor in tensors:
        if any(name not in source.shapes for name, _ in tensor.parts):
            continue
        first = tensor.parts[0][0]
        if len(tensor.parts) == 1 and tensor.parts[0][1] == ((0, source.shapes[first][0]),):
            plan.append(source.planned(first, tensor.name, dtype))
            continue
        rows = sum(hi - lo for _, part_rows in tensor.parts for lo, hi in part_rows)
        shape = (rows, *source.shapes[first][1:])
        plan.append(PlannedTensor(tensor.name, shape, source.output_dtype(first, dtype),
                                  lambda tensor=tensor, shape=shape: _assemble(tensor, shape, source)))
    return plan


def _assemble(tensor: LayoutTensor, shape: tuple[int, ...], source: TensorSource) -> torch.Tensor:
    """The layout tensor from its diffusers parts, each part's rows put back where they came from."""
    first = source.get(tensor.parts[0][0])
    out = torch.empty(shape, dtype=first.dtype)
    for name, rows in tensor.parts:
        part = first if name == tensor.parts[0][0] else source.get(name)
        offset = 0
        for lo, hi in rows:
            out[lo:hi] = part[offset:offset + hi - lo]
            offset += hi - lo
    return out


def write_model_folder(folder: Path, model_class: str, config: dict, plan: list[PlannedTensor]) -> int:
    """A bare model folder (config.json + weights), as `<model_class>.from_pretrained` reads it."""
    build_on_meta(model_class, config).save_config(folder)
    return write_safetensors(folder / f"{WEIGHTS}.safetensors", plan, {"format": "pt"})


def model_folder(folder: Path, model_class: str) -> Path | None:
    """The folder holding a `model_class` config and weights: `folder` itself or its `transformer/`."""
    for candidate in (folder, folder / TRANSFORMER):
        config = candidate / "config.json"
        if config.is_file() and read_json_object(config).get("_class_name") == model_class:
            return candidate
    return None


# -- where LoRA targets live (merge, extract) ------------------------------------------------------------


def folder_targets(path: Path, base: str, architecture: Architecture) -> CheckpointTargets:
    """A diffusers transformer folder (its weights beside config.json) or a pipeline folder (one source per
    component the architecture has)."""
    if (path / "config.json").is_file():
        source = open_component(path, WEIGHTS)
        locations = diffusers_locations(architecture, {TRANSFORMER: source}, SINGLE_FILE)
        return CheckpointTargets(path, base, True, architecture, locations, {SINGLE_FILE: source})
    components = {target.component for target in architecture.targets.values()}
    sources = {c: open_component(path / c, WEIGHT_STEMS[c]) for c in components if (path / c).is_dir()}
    return CheckpointTargets(path, base, True, architecture, diffusers_locations(architecture, sources), sources)


def diffusers_file_targets(path: Path, base: str, architecture: Architecture, source: TensorSource,
                           prefix: str = "") -> CheckpointTargets:
    """A single file of the transformer's tensors under their diffusers names (after `prefix`)."""
    locations = {}
    for target in architecture.targets.values():
        key = f"{prefix}{target.module_path}.weight"
        if key in source.shapes:
            bias = f"{prefix}{target.module_path}.bias"
            location = WeightLocation(SINGLE_FILE, key, bias if bias in source.shapes else None)
            locations[target.path] = checked(location, source, target.shape)
    return CheckpointTargets(path, base, False, architecture, locations, {SINGLE_FILE: source})


def layout_file_targets(path: Path, base: str, architecture: Architecture, source: TensorSource, prefix: str,
                        layout: Sequence[FusedModule]) -> CheckpointTargets:
    """A single file in the family's layout: each target is a layout weight, a row block of a fused one, a
    weight stored with its two row halves swapped, or (a target the layout names as diffusers does) its own."""
    locations = diffusers_file_targets(path, base, architecture, source, prefix).locations
    for module in layout:
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
    return CheckpointTargets(path, base, False, architecture, locations, {SINGLE_FILE: source})


# -- one family's single-file layout, converted and located as a whole ----------------------------------------


def _no_warnings(config: dict) -> list[str]:
    return []


@dataclass(frozen=True)
class SingleFileLayout:
    """What a transformer family says about its single files; the methods convert them and locate merge targets.
    A file holds either the layout's names (`marker` among them) or diffusers' own."""

    base: str
    title: str  # for messages: "Flux.2"
    model_class: str
    marker: str  # a bare key only a file in the layout's names holds
    prefix: Callable[[dict], str | None]  # the key prefix of the family's transformer in a file; None: not one
    config: Callable[[dict[str, tuple[int, ...]]], dict]  # the model config from the bare shapes
    tensors: Callable[[dict, dict[str, tuple[int, ...]], bool], list[LayoutTensor]]  # config, shapes, layout names?
    layout: Callable[[Architecture], Sequence[FusedModule]]  # the layout's Linears of an architecture
    architecture: Callable[[dict], Architecture]  # the targets of a config
    folder_config: Callable[[dict], dict] = lambda config: config  # a saved config as the class takes it
    warnings: Callable[[dict], list[str]] = _no_warnings  # what a folder written with this config should say

    def _bare(self, source: TensorSource) -> tuple[str, dict[str, tuple[int, ...]]]:
        prefix = self.prefix(source.shapes)
        if prefix is None:
            raise BadFileError(f"no {self.title} transformer in the file")
        return prefix, {k[len(prefix):]: v for k, v in source.shapes.items() if k.startswith(prefix)}

    def _folder_config(self, transformer: Path) -> dict:
        return self.folder_config(saved_config(read_json_object(transformer / "config.json")))

    def owns_folder(self, folder: Path) -> bool:
        return model_folder(folder, self.model_class) is not None

    def file_plan(self, source: TensorSource, dtype: torch.dtype | None) -> tuple[dict, list[PlannedTensor], int]:
        """(the config from the shapes, the diffusers transformer's tensors in the model's order, how many of the
        file's tensors are not the transformer's)."""
        prefix, shapes = self._bare(source)
        config = self.config(shapes)
        if self.marker in shapes:
            plan, dropped = to_diffusers_plan(source, prefix, self.tensors(config, shapes, True), dtype)
        else:
            plan, dropped = [source.planned(prefix + k, k, dtype) for k in shapes], len(source.shapes) - len(shapes)
        return config, fit(self.model_class, config, plan, self.title), dropped

    def file_to_model(self, source: TensorSource, dtype: torch.dtype | None) -> torch.nn.Module:
        """A single file of the family as its diffusers transformer in memory (what `file_to_folder` would write):
        parameters built on `meta` and the file's tensors assigned; buffers no weight carries built for real."""
        import diffusers

        config, plan, _ = self.file_plan(source, dtype)
        with parameters_on_meta():
            model = getattr(diffusers, self.model_class).from_config(config)
        model.load_state_dict({p.name: planned_tensor(p) for p in plan}, strict=True, assign=True)
        return model

    def file_to_folder(self, source: TensorSource, dtype: torch.dtype | None, folder: Path) -> dict:
        """A single file of the family as a diffusers transformer folder, its config from the shapes."""
        config, plan, dropped = self.file_plan(source, dtype)
        written = write_model_folder(folder, self.model_class, config, plan)
        return {"base": self.base, "tensors": written, "dtype": plan_dtype(plan), "dropped": dropped,
                "warnings": self.warnings(config)}

    def folder_to_file(self, folder: Path, dtype: torch.dtype | None) -> tuple[str, list[PlannedTensor], list[str]]:
        """A diffusers transformer (or pipeline) folder as the family's single file, bare names."""
        transformer = model_folder(folder, self.model_class)
        if transformer is None:
            raise BadFileError(f"{folder.name} holds no {self.model_class}")
        config = self._folder_config(transformer)
        source = open_component(transformer, WEIGHTS)
        fit(self.model_class, config, [source.planned(k, k, None) for k in source.shapes], self.title)
        return self.base, to_layout_plan(source, self.tensors(config, source.shapes, False), dtype), []

    def targets(self, path: Path, source: TensorSource | None) -> CheckpointTargets | None:
        """The family's transformer or pipeline folder, or a single file (`source`, opened); None for any other."""
        if source is None:
            transformer = model_folder(path, self.model_class)
            if transformer is None:
                return None
            return folder_targets(path, self.base, self.architecture(self._folder_config(transformer)))
        prefix = self.prefix(source.shapes)
        if prefix is None:
            return None
        _, shapes = self._bare(source)
        architecture = self.architecture(self.config(shapes))
        if self.marker in shapes:
            return layout_file_targets(path, self.base, architecture, source, prefix, self.layout(architecture))
        return diffusers_file_targets(path, self.base, architecture, source, prefix)
