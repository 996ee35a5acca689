"""Where each LoRA target's weight lives in an SD3/SD3.5 checkpoint (merge, extract): an SAI single file (bare, as
Stability releases it, or under ComfyUI's `model.diffusion_model.`), a diffusers transformer folder, or a pipeline
folder with its text encoders. A single file's config is read from its shapes, so any size merges.
"""

from __future__ import annotations

from pathlib import Path

from adapterzoo.errors import BadFileError
from adapterzoo.formats.families.sd3.modules import (
    CLIP_G,
    CLIP_L,
    MMDIT_CLASS,
    T5,
    TEXT_ENCODERS,
    Sd3Architecture,
    architecture_from_tables,
    config_from_sai,
)
from adapterzoo.formats.families.sd3.probe import SD3, SD35, sai_prefix
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.tensor_source import TensorSource, open_component
from adapterzoo.formats.model.module_tables import module_table
from adapterzoo.formats.model.targets import TRANSFORMER
from adapterzoo.formats.model.weight_locations import (
    SINGLE_FILE,
    CheckpointTargets,
    WeightLocation,
    checked,
    diffusers_locations,
)

WEIGHTS = {TRANSFORMER: "diffusion_pytorch_model", CLIP_L: "model", CLIP_G: "model", T5: "model"}
_SAVE_ONLY = ("architectures", "transformers_version", "torch_dtype", "dtype")


def _config(path: Path) -> dict:
    """A saved config without what only describes the save (`_name_or_path`, versions)."""
    return {k: v for k, v in read_json_object(path).items() if not k.startswith("_") and k not in _SAVE_ONLY}


def _base(config: dict) -> str:
    return SD35 if config.get("qk_norm") else SD3


def transformer_folder(folder: Path) -> Path | None:
    """`folder` itself or its `transformer/`, whichever holds an SD3Transformer2DModel's config."""
    for candidate in (folder, folder / TRANSFORMER):
        config = candidate / "config.json"
        if config.is_file() and read_json_object(config).get("_class_name") == MMDIT_CLASS:
            return candidate
    return None


def folder_base(folder: Path) -> str:
    found = transformer_folder(folder)
    if found is None:
        raise BadFileError(f"{folder.name} holds no {MMDIT_CLASS}")
    return _base(_config(found / "config.json"))


def sd3_targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    """An SD3 folder (source None) or an opened SAI single file; None for any other model."""
    if source is None:
        return _folder_targets(path) if transformer_folder(path) is not None else None
    return _sai_targets(path, source) if sai_prefix(source.shapes) is not None else None


def _folder_targets(path: Path) -> CheckpointTargets:
    """A transformer folder (its weights in the folder itself) or a pipeline (transformer, and the text encoders
    it has)."""
    transformer = transformer_folder(path)
    config = _config(transformer / "config.json")
    tables = {TRANSFORMER: module_table(MMDIT_CLASS, config)}
    if transformer == path:
        architecture = architecture_from_tables(_base(config), tables)
        source = open_component(path, WEIGHTS[TRANSFORMER])
        locations = diffusers_locations(architecture, {TRANSFORMER: source}, SINGLE_FILE)
        return CheckpointTargets(path, architecture.base, True, architecture, locations, {SINGLE_FILE: source})
    index = read_json_object(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    for component in TEXT_ENCODERS:
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2 and (path / component / "config.json").is_file():
            tables[component] = module_table(entry[1], _config(path / component / "config.json"))
    architecture = architecture_from_tables(_base(config), tables)
    sources = {component: open_component(path / component, WEIGHTS[component]) for component in tables}
    return CheckpointTargets(path, architecture.base, True, architecture, diffusers_locations(architecture, sources),
                             sources)


def _sai_targets(path: Path, source: TensorSource) -> CheckpointTargets:
    """Each target's SAI weight: renamed, a row block of a fused qkv, or a final modulation with its halves
    swapped."""
    prefix = sai_prefix(source.shapes)
    config = config_from_sai({k[len(prefix):]: v for k, v in source.shapes.items() if k.startswith(prefix)})
    architecture: Sd3Architecture = architecture_from_tables(_base(config),
                                                             {TRANSFORMER: module_table(MMDIT_CLASS, config)})
    locations = {}
    for linear in architecture.sai:
        weight, bias = f"{prefix}{linear.name}.weight", f"{prefix}{linear.name}.bias"
        if weight not in source.shapes:
            continue
        bias_key = bias if bias in source.shapes else None
        for target, rows in linear.parts:
            if len(rows) == 2:
                location = WeightLocation(SINGLE_FILE, weight, bias_key, halves_swapped=True)
            else:
                whole = rows[0] == (0, linear.shape[0])
                location = WeightLocation(SINGLE_FILE, weight, bias_key, None if whole else rows[0])
            locations[target] = checked(location, source, architecture.targets[target].shape)
    return CheckpointTargets(path, architecture.base, False, architecture, locations, {SINGLE_FILE: source})
