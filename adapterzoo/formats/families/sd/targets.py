"""Where each SD1/SD2/SDXL LoRA target's weight lives: a single file, a diffusers pipeline folder, or a UNet
alone (ComfyUI's models/unet: a diffusers UNet folder or file, or LDM keys with or without their prefix).

The component configs (config.json in a folder, inferred from tensor shapes in a single file) give each
part's module table, and each target gets the tensor holding its weight: the UNet's LDM or diffusers key,
a text encoder's Hugging Face key, or a row block of OpenCLIP's fused `in_proj` (FORMATS.md §2.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.shape_reading import clip_config_from_hf
from adapterzoo.formats.families.sd.config_from_shapes import (
    unet_config_from_ldm,
    unet_layout_from_diffusers,
)
from adapterzoo.formats.families.sd.modules import architecture_from_tables
from adapterzoo.formats.families.sd.probe import LDM_TEXT_ENCODERS, single_file_base
from adapterzoo.formats.families.sd.to_single_file import diffusers_base
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.tensor_source import TensorSource, open_component
from adapterzoo.formats.model import unet_names
from adapterzoo.formats.model.clip_names import (
    TRANSPOSED,
    hf_to_openclip,
    is_openclip_root,
    openclip_to_hf,
    strip_text_model,
)
from adapterzoo.formats.model.module_tables import (
    CLIP_CLASS,
    CLIP_PROJECTION_CLASS,
    UNET_CLASS,
    ModuleTable,
    module_table,
)
from adapterzoo.formats.model.targets import TEXT_ENCODERS, UNET, relative
from adapterzoo.formats.model.weight_locations import (
    SINGLE_FILE,
    WEIGHT_STEMS,
    CheckpointTargets,
    WeightLocation,
    checked,
    diffusers_locations,
)

SDXL_POOLED_WIDTH = 1280  # bigG's projection; only sizes the UNet's unused time-id projection when te2 is absent
_CLIP_CLASSES = (CLIP_CLASS, CLIP_PROJECTION_CLASS)


def sd_targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    """Targets of a single-file SD1/SD2/SDXL checkpoint (`source`, opened), a diffusers pipeline folder, or a
    UNet on its own; None for a folder that is neither a pipeline nor a model folder."""
    if source is not None:
        base = single_file_base(source.table())
        return _single_file_targets(path, source, base) if base in LDM_TEXT_ENCODERS else None
    if (path / "model_index.json").is_file():
        return _folder_targets(path)
    if (path / "config.json").is_file():
        return _unet_folder_targets(path)
    return None


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
    return CheckpointTargets(folder, base, True, architecture, diffusers_locations(architecture, sources), sources)


def _unet_folder_targets(folder: Path) -> CheckpointTargets:
    """A diffusers UNet saved on its own (config.json and its weights, no pipeline around it); its base is
    read from its tensors, as for a single file. Its weights live in the folder itself: file SINGLE_FILE."""
    table = _folder_table(folder, UNET, read_json_object(folder / "config.json").get("_class_name"))
    source = open_component(folder, WEIGHT_STEMS[UNET])
    base = single_file_base(source.table())
    if base not in LDM_TEXT_ENCODERS:
        raise BadFileError(f"{folder.name} holds no SD1, SD2 or SDXL UNet weights")
    architecture = architecture_from_tables(base, {UNET: table})
    locations = diffusers_locations(architecture, {UNET: source}, SINGLE_FILE)
    return CheckpointTargets(folder, base, True, architecture, locations, {SINGLE_FILE: source})


# -- single files ---------------------------------------------------------------------------------


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


def _single_file_targets(path: Path, source: TensorSource, base: str) -> CheckpointTargets:
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
            locations[target.path] = checked(location, source, target.shape)
    return CheckpointTargets(path, base, False, architecture, locations, {SINGLE_FILE: source})
