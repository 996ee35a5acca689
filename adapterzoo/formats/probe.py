"""`probe`: what a file or folder is, from keys and shapes; metadata is only a hint.

safetensors files are judged from the header (plus the few 0-d alpha scalars of a LoRA), so
probing a multi-GB checkpoint reads kilobytes. Pickles must be unpickled, always safely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.probe_checkpoint import CONTEXT_BASE, probe_checkpoint
from adapterzoo.formats.embedding.probe_embedding import (
    probe_a1111_embedding,
    probe_a1111_hypernetwork,
    probe_embedding_table,
    probe_safetensors_hypernetwork,
)
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.model_folders import PEFT_CONFIG, peft_component_folders
from adapterzoo.formats.io.pickle_safe import (
    PICKLE_SUFFIXES,
    load_pickle,
    unwrap_state_dict,
)
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.safetensors_header import read_header, safetensors_errors
from adapterzoo.formats.io.tensor_table import (
    TensorTable,
    dominant_dtype,
    one_number,
    table_from_header,
    table_from_state_dict,
)
from adapterzoo.formats.lora.lora_keys import lora_like_key
from adapterzoo.formats.lora.probe_lora import ScalarReader, probe_lora

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
LORA_UNREAD = "looks like a LoRA, but its key names match no dialect we read"  # the warning, and convert's reason
PEFT_WEIGHTS = "adapter_model.safetensors"
PIPELINE_BASES = {
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
}


def classify(
    table: TensorTable,
    metadata: dict[str, str],
    scalar: ScalarReader,
    result: ProbeResult,
    peft_config: dict | None = None,
) -> ProbeResult:
    """Run the recognisers in order of how specific their key families are."""
    result.tensors = len(table)
    result.metadata = metadata
    result.dtype = dominant_dtype(table)
    if not (
        probe_lora(table, metadata, scalar, result, peft_config)
        or probe_safetensors_hypernetwork(table, metadata, result)
        or probe_embedding_table(table, result)
        or probe_checkpoint(table, result)
    ):
        key = lora_like_key(list(table))
        result.warnings.append(f"{LORA_UNREAD}: first key {key}" if key else
                               "no known key family: not a checkpoint, adapter or embedding we recognise")
    return result


def _probe_safetensors(path: Path, peft_config: dict | None = None) -> ProbeResult:
    header = read_header(path)
    result = ProbeResult(path=str(path), data_offset=header.data_offset)
    with safetensors_errors(path), safe_open(str(path), framework="pt") as handle:  # maps it; reads only alphas

        def scalar(key: str) -> float:
            return one_number(key, handle.get_tensor(key))

        return classify(table_from_header(header), header.metadata, scalar, result, peft_config)


def _probe_pickle(path: Path) -> ProbeResult:
    obj = load_pickle(path)
    result = ProbeResult(path=str(path))
    if probe_a1111_embedding(obj, result) or probe_a1111_hypernetwork(obj, result):
        result.dtype = result.dtype or _pickle_dtype(obj)
        return result
    state = unwrap_state_dict(obj)
    if not isinstance(state, dict):
        raise BadFileError(f"pickle holds a {type(state).__name__}, not a state dict")
    table = table_from_state_dict(state)

    def scalar(key: str) -> float:
        return one_number(key, state[key])

    return classify(table, {}, scalar, result)


def _pickle_dtype(obj: Any) -> str | None:
    tensors = {}
    for w, pair in obj.items():
        if isinstance(w, int):
            for i, sd in enumerate(pair):
                tensors.update({f"{w}.{i}.{k}": v for k, v in sd.items()})
    return dominant_dtype(table_from_state_dict(tensors))




def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _probe_diffusers_folder(folder: Path) -> ProbeResult:
    index = read_json_object(folder / "model_index.json")
    components = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0])
    result = ProbeResult(path=str(folder), kind="checkpoint", format="diffusers")
    result.details["pipeline"] = index.get("_class_name")
    result.details["components"] = components
    table: TensorTable = {}
    for component in components:
        for weights in _weight_files(folder / component):
            table.update({f"{component}.{k}": v for k, v in table_from_header(read_header(weights)).items()})
    result.tensors = len(table)
    main_part = next((c for c in ("unet", "transformer") if c in components), None)
    main_table = {k: v for k, v in table.items() if main_part and k.startswith(main_part + ".")}
    result.dtype = dominant_dtype(main_table or table)
    base = PIPELINE_BASES.get(str(index.get("_class_name")))
    if main_part and (folder / main_part / "config.json").is_file():
        config = read_json_object(folder / main_part / "config.json")
        context = config.get("cross_attention_dim")
        base = base or CONTEXT_BASE.get(context if isinstance(context, int) else -1)
        in_channels = config.get("in_channels")
        result.details["in_channels"] = in_channels
        if in_channels == 9:
            result.details["variant"] = "inpaint"
    result.base = base or "unknown"
    if not table:
        result.warnings.append("no .safetensors weights found in the component folders")
    return result


def _diffusers_model_weights(folder: Path) -> list[Path]:
    """The weights of one diffusers model saved on its own (config.json beside diffusion_pytorch_model
    safetensors, whole or sharded), as ComfyUI's models/unet holds a UNet; empty for any other folder."""
    if not (folder / "config.json").is_file():
        return []
    return sorted(p for p in folder.glob("diffusion_pytorch_model*.safetensors") if p.is_file())


def _probe_diffusers_model(folder: Path, weights: list[Path]) -> ProbeResult:
    """Its weight files' headers as one table, judged as a file of them would be."""
    table: TensorTable = {}
    files: dict[str, Path] = {}
    for path in weights:
        part = table_from_header(read_header(path))
        table.update(part)
        files.update(dict.fromkeys(part, path))

    def scalar(key: str) -> float:
        with safe_open(str(files[key]), framework="pt") as handle:
            return float(handle.get_tensor(key).float().item())

    return classify(table, {}, scalar, ProbeResult(path=str(folder)))


def _peft_weights(adapter: Path, where: str = "PEFT folder") -> Path:
    weights = adapter / PEFT_WEIGHTS
    if not weights.is_file():
        raise BadFileError(f"{where} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")
    return weights


def _probe_peft_folder(folder: Path) -> ProbeResult:
    config = read_json_object(folder / PEFT_CONFIG)
    result = _probe_safetensors(_peft_weights(folder), peft_config=config)
    result.path = str(folder)
    result.format = "peft" if result.kind == "lora" else result.format
    return result


def _probe_peft_components(folder: Path, components: dict[str, Path]) -> ProbeResult:
    """Headers of every part's weights as one table, keys prefixed with their component as in a diffusers
    LoRA file, so the shape rules tell text encoders from the UNet; configs flattened the same way."""
    table: TensorTable = {}
    metadata: dict[str, str] = {}
    config: dict[str, Any] = {}
    files: dict[str, Path] = {}
    for component, adapter in components.items():
        files[component] = _peft_weights(adapter, f"{component}/")
        header = read_header(files[component])
        table.update({f"{component}.{k}": v for k, v in table_from_header(header).items()})
        metadata.update(header.metadata)
        config.update({f"{component}.{k}": v for k, v in read_json_object(adapter / PEFT_CONFIG).items()})

    def scalar(key: str) -> float:
        component, _, name = key.partition(".")
        with safetensors_errors(files[component]), safe_open(str(files[component]), framework="pt") as handle:
            return one_number(key, handle.get_tensor(name))

    result = classify(table, metadata, scalar, ProbeResult(path=str(folder)), config)
    result.format = "peft" if result.kind == "lora" else result.format
    result.details["components"] = list(components)
    return result


def probe(path: str | os.PathLike) -> ProbeResult:
    """Identify a file, a diffusers pipeline folder, one diffusers model's folder (a UNet, a VAE) or a PEFT
    folder (one adapter, or one per component as diffusers saves them); BadFileError or UnsafeFileError if
    it can't be read."""
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return _probe_diffusers_folder(path)
        if (path / PEFT_CONFIG).is_file():
            return _probe_peft_folder(path)
        if components := peft_component_folders(path):
            return _probe_peft_components(path, components)
        if weights := _diffusers_model_weights(path):
            return _probe_diffusers_model(path, weights)
        raise BadFileError("folder is neither a diffusers pipeline (model_index.json), a diffusers model "
                           "(config.json, diffusion_pytorch_model.safetensors) nor a PEFT adapter")
    if not path.is_file():
        raise BadFileError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return _probe_pickle(path)
    if suffix in SAFETENSORS_SUFFIXES:
        return _probe_safetensors(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return _probe_pickle(path)
    return _probe_safetensors(path)
