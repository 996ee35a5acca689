"""Where each LoRA target's weight lives inside a checkpoint: a single file or a diffusers folder, or a
UNet alone (ComfyUI's models/unet: a diffusers UNet folder or file, or LDM keys with or without their prefix).

LoRA names are resolved against the checkpoint's own modules, whatever its size: the component
configs (config.json in a folder, inferred from tensor shapes in a single file) give each part's
module table (`module_tables`), `architecture_from_tables` lists their targets, and each target gets the tensor
holding its weight: the UNet's LDM or diffusers key, a text encoder's Hugging Face key, or a row
block of OpenCLIP's fused `in_proj` (FORMATS.md §2.3). Flux.1 checkpoints (a BFL single file, a diffusers
transformer or pipeline folder) locate each diffusers target in the same way: a row block of BFL's fused
`qkv`/`linear1`, or the final modulation with its halves swapped (FLUX.md §1.2). `merge` writes into
these tensors and `extract` reads them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.checkpoint.checkpoint_config import (
    clip_config_from_hf,
    unet_config_from_ldm,
    unet_layout_from_diffusers,
)
from adapterzoo.formats.checkpoint.checkpoint_to_ldm import diffusers_base
from adapterzoo.formats.checkpoint.flux_checkpoint import flux_transformer_folder
from adapterzoo.formats.checkpoint.probe_checkpoint import probe_checkpoint
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.safetensors_writer import SAFETENSORS_DTYPES
from adapterzoo.formats.io.tensor_source import TensorSource, open_checkpoint_file, open_component
from adapterzoo.formats.io.tensor_table import TensorMeta
from adapterzoo.formats.model import unet_names
from adapterzoo.formats.model.architectures import TEXT_ENCODERS, UNET, Architecture, architecture_from_tables, relative
from adapterzoo.formats.model.clip_names import (
    LDM_TEXT_ENCODERS,
    TRANSPOSED,
    hf_to_openclip,
    is_openclip_root,
    openclip_to_hf,
    strip_text_model,
)
from adapterzoo.formats.model.flux_modules import TRANSFORMER, bfl_prefix, flux_checkpoint_architecture
from adapterzoo.formats.model.module_tables import CLIP_CLASS, CLIP_PROJECTION_CLASS, UNET_CLASS, ModuleTable, module_table
from adapterzoo.formats.probe import probe

SINGLE_FILE = ""  # WeightLocation.file of every tensor of a single-file checkpoint
LORA_BASES = ("sd1", "sd2", "sdxl")
WEIGHT_STEMS = {UNET: "diffusion_pytorch_model", TRANSFORMER: "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
SDXL_POOLED_WIDTH = 1280  # bigG's projection; only sizes the UNet's unused time-id projection when te2 is absent
_CLIP_CLASSES = (CLIP_CLASS, CLIP_PROJECTION_CLASS)


@dataclass(frozen=True)
class WeightLocation:
    """The stored tensor that holds one target's weight (and bias), and how the target sits in it."""

    file: str  # component folder ("unet", "text_encoder", ...) of a pipeline folder; SINGLE_FILE otherwise
    key: str  # the weight tensor's key in that file
    bias: str | None = None  # the bias tensor's key, if the module has one stored
    rows: tuple[int, int] | None = None  # [start, stop) rows of a fused OpenCLIP in_proj weight and bias
    transposed: bool = False  # stored as the transpose of the module's weight (OpenCLIP text_projection)
    halves_swapped: bool = False  # stored with its two row halves swapped (Flux's final modulation in BFL)

    def region(self, stored: torch.Tensor) -> torch.Tensor:
        """The part of the stored weight (or bias) tensor that is this target's: a view of it."""
        return stored if self.rows is None else stored[self.rows[0]:self.rows[1]]

    def as_module(self, region: torch.Tensor) -> torch.Tensor:
        """The region laid out as the module holds it; a view when nothing moves, else a copy."""
        if self.halves_swapped:
            region = torch.cat(region.chunk(2)[::-1])
        return region.t().contiguous() if self.transposed else region

    def as_stored(self, module: torch.Tensor) -> torch.Tensor:
        """The inverse of `as_module` (both moves are their own inverse)."""
        if self.transposed:
            module = module.t()
        return torch.cat(module.chunk(2)[::-1]) if self.halves_swapped else module

    @property
    def moved(self) -> bool:
        """Whether `as_module` copies, so a change to it must be written back with `as_stored`."""
        return self.transposed or self.halves_swapped


@dataclass
class CheckpointTargets:
    """A checkpoint's LoRA targets (`architecture`) and, for each, where its weight is stored."""

    path: Path
    base: str
    is_folder: bool
    architecture: Architecture
    locations: dict[str, WeightLocation]  # canonical target path -> where its weight lives
    sources: dict[str, TensorSource]  # WeightLocation.file -> lazily read tensors

    def weight(self, target: str) -> torch.Tensor:
        """The target's weight as its module holds it (shape and layout), in the stored dtype."""
        location = self.locations[target]
        tensor = location.as_module(location.region(self.sources[location.file].get(location.key)))
        return tensor.reshape(self.architecture.targets[target].shape)

    def bias(self, target: str) -> torch.Tensor | None:
        """The target's bias as its module holds it, or None if none is stored."""
        location = self.locations[target]
        if location.bias is None:
            return None
        return location.as_module(location.region(self.sources[location.file].get(location.bias)))

    @property
    def components(self) -> set[str]:
        """The model parts LoRAs can land on: {"unet"} for a UNet alone."""
        return {target.component for target in self.architecture.targets.values()}

    def by_key(self, file: str) -> dict[str, list[str]]:
        """Stored weight or bias key of `file` -> the targets living in it (q, k and v share an in_proj)."""
        out: dict[str, list[str]] = {}
        for target, location in self.locations.items():
            if location.file == file:
                out.setdefault(location.key, []).append(target)
                if location.bias is not None:
                    out.setdefault(location.bias, []).append(target)
        return out


def checkpoint_targets(path: str | os.PathLike) -> CheckpointTargets:
    """Targets and weight locations of a single-file SD1/SD2/SDXL checkpoint, a diffusers pipeline folder,
    a UNet on its own (a diffusers UNet folder, or a file of its tensors alone), or a Flux.1 model (BFL
    single file, diffusers transformer or pipeline folder)."""
    path = Path(path)
    if not path.exists():
        raise BadFileError(f"{path} does not exist")
    if path.is_dir() and flux_transformer_folder(path) is not None:
        return _flux_folder_targets(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _folder_targets(path)
        if (path / "config.json").is_file():
            return _unet_folder_targets(path)
        raise BadFileError(f"{path.name} is neither a diffusers pipeline (model_index.json) nor a UNet folder "
                           "(config.json)")
    return _single_file_targets(path)


def check_lora_base(targets: CheckpointTargets, lora: str | os.PathLike) -> None:
    """Refuse a LoRA whose probed base differs from the checkpoint's; an undecided probe passes."""
    found = probe(lora)
    if found.base in (*LORA_BASES, "flux") and found.base != targets.base:
        raise AdapterzooError(
            f"{Path(lora).name} is a {found.base} {found.kind} but {targets.path.name} is a {targets.base} "
            "checkpoint; a LoRA only fits the base it was trained on"
        )


# -- diffusers folders ----------------------------------------------------------------------------


def _folder_table(folder: Path, component: str, class_name: object) -> ModuleTable:
    """The module table of the component whose config.json is in `folder`."""
    if component == UNET and class_name != UNET_CLASS:
        raise BadFileError(f"{folder.name} is a {class_name}; LoRAs are merged into {UNET_CLASS} only")
    if component != UNET and class_name not in _CLIP_CLASSES:
        raise BadFileError(f"{component} is a {class_name}; LoRAs are merged into CLIP text encoders only")
    return module_table(str(class_name), read_json_object(folder / "config.json"))


def _folder_targets(folder: Path) -> CheckpointTargets:
    base = diffusers_base(folder)
    index = read_json_object(folder / "model_index.json")
    tables: dict[str, ModuleTable] = {}
    sources: dict[str, TensorSource] = {}
    for component in (UNET, *TEXT_ENCODERS):
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            tables[component] = _folder_table(folder / component, component, entry[1])
            sources[component] = open_component(folder / component, WEIGHT_STEMS[component])
    architecture = architecture_from_tables(base, tables)
    return CheckpointTargets(folder, base, True, architecture, _diffusers_locations(architecture, sources), sources)


def _unet_folder_targets(folder: Path) -> CheckpointTargets:
    """A diffusers UNet saved on its own (config.json and its weights, no pipeline around it); its base is
    read from its tensors, as for a single file. Its weights live in the folder itself: file SINGLE_FILE."""
    table = _folder_table(folder, UNET, read_json_object(folder / "config.json").get("_class_name"))
    source = open_component(folder, WEIGHT_STEMS[UNET])
    base = _single_file_base(source, folder.name)
    architecture = architecture_from_tables(base, {UNET: table})
    locations = _diffusers_locations(architecture, {UNET: source}, SINGLE_FILE)
    return CheckpointTargets(folder, base, True, architecture, locations, {SINGLE_FILE: source})


def _diffusers_locations(architecture: Architecture, sources: dict[str, TensorSource], file: str | None = None
                         ) -> dict[str, WeightLocation]:
    """Each target's weight in its component's diffusers-keyed tensors; `file` names where they live if not
    in the component's own folder."""
    stripped = {c: {strip_text_model(k): k for k in s.shapes} for c, s in sources.items() if c != UNET}
    locations = {}
    for target in architecture.targets.values():
        source, stored = sources[target.component], stripped.get(target.component)
        key = _stored(source, target.module_path + ".weight", stored)
        if key is not None:
            bias = _stored(source, target.module_path + ".bias", stored)
            location = WeightLocation(target.component if file is None else file, key, bias)
            locations[target.path] = _checked(location, source, target.shape)
    return locations


def _stored(source: TensorSource, name: str, by_stripped: dict[str, str] | None) -> str | None:
    """The key holding `name`: as spelled, or (text encoders) with or without transformers' `text_model.`."""
    if name in source.shapes:
        return name
    return None if by_stripped is None else by_stripped.get(strip_text_model(name))


def _checked(location: WeightLocation, source: TensorSource, shape: tuple[int, ...]) -> WeightLocation:
    stored = source.shapes[location.key]
    rows = stored[0] if location.rows is None else location.rows[1] - location.rows[0]
    numel = rows * int(torch.Size(stored[1:]).numel()) if stored else 1
    if numel != int(torch.Size(shape).numel()):
        raise BadFileError(f"{location.key} is {list(stored)}, which cannot hold a {list(shape)} module weight")
    return location


# -- single files ---------------------------------------------------------------------------------


def _single_file_base(source: TensorSource, name: str) -> str:
    table = {k: TensorMeta(shape, SAFETENSORS_DTYPES.get(source.dtypes[k], "?")) for k, shape in source.shapes.items()}
    result = ProbeResult(path=name)
    if not probe_checkpoint(table, result) or result.kind != "checkpoint":
        raise BadFileError(f"{name} is not a checkpoint (no SD UNet or text encoder weights)")
    if result.base not in LORA_BASES:
        raise BadFileError(f"{name} is a {result.base} checkpoint; LoRAs are merged into SD1, SD2 and SDXL ones")
    return result.base


def _under(source: TensorSource, prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: k for k in source.shapes if k.startswith(prefix)}


@dataclass(frozen=True)
class ModelPart:
    """One model inside a single file: the class and config it is built from, and its stored keys by the
    names the part's own format gives them (LDM names under the UNet, OpenCLIP or HF ones for text)."""

    model_class: str
    config: dict
    keys: dict[str, str]


def single_file_parts(source: TensorSource, base: str) -> dict[str, ModelPart]:
    """The UNet and text encoders a single file of `base` holds, their configs inferred from its shapes."""
    parts: dict[str, ModelPart] = {}
    for component, prefix in LDM_TEXT_ENCODERS[base].items():
        part = _single_text_encoder(source, component, prefix)
        if part is not None:
            parts[component] = part
    unet_keys = _unet_keys(source)
    if unet_keys:
        shapes = {rest: source.shapes[key] for rest, key in unet_keys.items()}
        te2 = parts.get("text_encoder_2")
        pooled = te2.config.get("projection_dim", SDXL_POOLED_WIDTH) if te2 else SDXL_POOLED_WIDTH
        config = unet_config_from_ldm(shapes, base, pooled, "epsilon")
        parts = {UNET: ModelPart(UNET_CLASS, config, unet_keys), **parts}
    return parts


def _unet_keys(source: TensorSource) -> dict[str, str]:
    """A single file's UNet keys by their LDM names: under `model.diffusion_model.` in a full checkpoint; a
    UNet saved alone (ComfyUI's models/unet) may hold LDM keys without that prefix, or diffusers ones."""
    prefixed = _under(source, unet_names.LDM_PREFIX)
    if prefixed or "input_blocks.0.0.weight" in source.shapes:
        return prefixed or {k: k for k in source.shapes}
    if "conv_in.weight" not in source.shapes:
        return {}
    layout = unet_layout_from_diffusers(source.shapes)
    keys = {}
    for key in source.shapes:
        name = unet_names.diffusers_to_ldm_module(key, layout)
        if name is None:
            raise BadFileError(f"unet tensor {key} has no place in an SD UNet")
        keys[name] = key
    return keys


def _single_text_encoder(source: TensorSource, component: str, prefix: str) -> ModelPart | None:
    """A single file's text encoder as an HF CLIP model; its keys by OpenCLIP names for an OpenCLIP root,
    by HF names without `text_model.` otherwise."""
    openclip = is_openclip_root(prefix)
    keys = {rest if openclip else strip_text_model(rest): key for rest, key in _under(source, prefix).items()}
    if not keys:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for rest, key in keys.items():
        names = openclip_to_hf(rest) if openclip else [rest]
        for name in names or ():
            shape = source.shapes[key]
            if len(names) == 3:
                shape = (shape[0] // 3, *shape[1:])
            elif rest == TRANSPOSED:
                shape = tuple(reversed(shape))
            shapes[name] = shape
    with_projection = component == "text_encoder_2" and "text_projection.weight" in shapes
    model_class = CLIP_PROJECTION_CLASS if with_projection else CLIP_CLASS
    return ModelPart(model_class, clip_config_from_hf(shapes, openclip), keys)


def _text_location(keys: dict[str, str], prefix: str, rel: str, rows: int) -> WeightLocation | None:
    """Location of HF module `rel` inside a single file's text encoder stored under `prefix`."""
    if not is_openclip_root(prefix):
        weight = keys.get(rel + ".weight")
        return None if weight is None else WeightLocation(SINGLE_FILE, weight, keys.get(rel + ".bias"))
    mapped = hf_to_openclip(rel + ".weight")
    if mapped is None or mapped[0] not in keys:
        return None
    name, slot = mapped
    bias = hf_to_openclip(rel + ".bias")
    bias_key = keys.get(bias[0]) if bias is not None else None
    span = None if slot is None else (slot * rows, (slot + 1) * rows)
    return WeightLocation(SINGLE_FILE, keys[name], bias_key, span, name == TRANSPOSED)


def _single_file_targets(path: Path) -> CheckpointTargets:
    source = open_checkpoint_file(path)
    if bfl_prefix(source.shapes) is not None:
        return _bfl_targets(path, source)
    base = _single_file_base(source, path.name)
    parts = single_file_parts(source, base)
    tables = {component: module_table(part.model_class, part.config) for component, part in parts.items()}
    architecture = architecture_from_tables(base, tables)
    locations = {}
    for target in architecture.targets.values():
        keys = parts[target.component].keys
        if target.component == UNET:
            weight = keys.get(f"{target.ldm_path}.weight") if target.ldm_path else None
            bias = keys.get(f"{target.ldm_path}.bias")
            location = None if weight is None else WeightLocation(SINGLE_FILE, weight, bias)
        else:
            prefix = LDM_TEXT_ENCODERS[base][target.component]
            location = _text_location(keys, prefix, relative(target), target.shape[0])
        if location is not None:
            locations[target.path] = _checked(location, source, target.shape)
    return CheckpointTargets(path, base, False, architecture, locations, {SINGLE_FILE: source})


# -- Flux.1 ---------------------------------------------------------------------------------------


def _flux_folder_targets(path: Path) -> CheckpointTargets:
    """A diffusers Flux transformer folder, or a pipeline folder (transformer, and CLIP/T5 when present)."""
    architecture = flux_checkpoint_architecture(path)
    if architecture is None:
        raise BadFileError(f"{path.name} is not a Flux model folder")
    if (path / "config.json").is_file():  # the transformer alone: its weights live in the folder itself
        source = open_component(path, WEIGHT_STEMS[TRANSFORMER])
        locations = _diffusers_locations(architecture, {TRANSFORMER: source}, SINGLE_FILE)
        return CheckpointTargets(path, "flux", True, architecture, locations, {SINGLE_FILE: source})
    components = {target.component for target in architecture.targets.values()}
    sources = {c: open_component(path / c, WEIGHT_STEMS[c]) for c in components}
    return CheckpointTargets(path, "flux", True, architecture, _diffusers_locations(architecture, sources), sources)


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
            locations[target] = _checked(location, source, architecture.targets[target].shape)
    return CheckpointTargets(path, "flux", False, architecture, locations, {SINGLE_FILE: source})
