"""`probe`: what a file or folder is, from keys and shapes; metadata is only a hint.

safetensors files are judged from the header (plus the few 0-d alpha scalars of a LoRA, read as bytes),
with plain file I/O: probing a checkpoint larger than memory reads kilobytes, maps nothing and needs no
torch. Pickles must be unpickled, always safely (torch is imported for them only).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.probe_checkpoint import probe_checkpoint
from adapterzoo.formats.embedding.probe_embedding import (
    probe_a1111_embedding,
    probe_a1111_hypernetwork,
    probe_embedding_table,
    probe_safetensors_hypernetwork,
)
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.model_folders import PEFT_CONFIG, peft_component_folders
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.safetensors_header import SafetensorsHeader, read_header
from adapterzoo.formats.io.safetensors_values import read_number
from adapterzoo.formats.io.tensor_table import (
    FRIENDLY_DTYPE,
    TensorMeta,
    TensorTable,
    dominant_dtype,
    one_number,
    table_from_header,
    table_from_state_dict,
)
from adapterzoo.formats.lora.lora_keys import lora_like_key
from adapterzoo.formats.lora.probe_lora import ScalarReader, probe_lora
from adapterzoo.formats.model.registry import families, family_of, first

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
GGUF_SUFFIX = ".gguf"
LORA_UNREAD = "looks like a LoRA, but its key names match no dialect we read"  # the warning, and convert's reason
PEFT_WEIGHTS = "adapter_model.safetensors"


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


def _numbers(files: dict[str, tuple[Path, SafetensorsHeader]]) -> ScalarReader:
    """A reader of the scalars (alphas) of the files holding each key, by plain file I/O."""
    def scalar(key: str) -> float:
        path, header = files[key]
        return read_number(path, header, key)

    return scalar


def _probe_safetensors(path: Path, peft_config: dict | None = None) -> ProbeResult:
    header = read_header(path)
    result = ProbeResult(path=str(path), data_offset=header.data_offset)
    scalar = _numbers(dict.fromkeys(header.tensors, (path, header)))
    return classify(table_from_header(header), header.metadata, scalar, result, peft_config)


def _probe_gguf(path: Path) -> ProbeResult:
    """A GGUF's names and shapes through the same recognisers; format `gguf`, the family's own layout in
    `details.layout`, the quantisation types (tensors per type) in `details.quantization`, dtype the commonest."""
    from adapterzoo.formats.io.gguf_header import UNQUANTISED, read_gguf_header, read_scalar

    header = read_gguf_header(path)
    table = {name: TensorMeta(t.shape, t.quant) for name, t in header.tensors.items()}
    metadata = {k: str(v) for k, v in header.metadata.items() if not isinstance(v, list)}
    result = classify(table, metadata, lambda key: read_scalar(path, header, key), ProbeResult(path=str(path)))
    counts: dict[str, int] = {}
    elements: dict[str, int] = {}
    for meta in table.values():
        counts[meta.dtype] = counts.get(meta.dtype, 0) + 1
        elements[meta.dtype] = elements.get(meta.dtype, 0) + meta.numel
    quant = max(elements, key=elements.__getitem__) if elements else None
    result.dtype = FRIENDLY_DTYPE.get(quant, quant) if quant in UNQUANTISED else quant
    result.details |= {"layout": result.format, "quantization": dict(sorted(counts.items())),
                       "gguf_architecture": metadata.get("general.architecture")}
    result.format = "gguf"
    if result.base == "unknown" and metadata.get("general.architecture"):
        result.warnings.append(f"a GGUF of a {metadata['general.architecture']!r} model (general.architecture), "
                               "whose tensors no family here recognises")
    return result


def _probe_pickle(path: Path) -> ProbeResult:
    from adapterzoo.formats.io.pickle_safe import load_pickle, unwrap_state_dict  # the unpickler, for pickles only

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
    config = {}
    if main_part and (folder / main_part / "config.json").is_file():
        config = read_json_object(folder / main_part / "config.json")
        in_channels = config.get("in_channels")
        result.details["in_channels"] = in_channels
        if in_channels == 9:
            result.details["variant"] = "inpaint"
    pipeline = str(index.get("_class_name"))
    result.base = first(family.pipeline_base(pipeline, config) for family in families()) or "unknown"
    if (family := family_of(result.base)) is not None:
        family.describe_folder(config, result)
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
    files: dict[str, tuple[Path, SafetensorsHeader]] = {}
    for path in weights:
        header = read_header(path)
        table.update(table_from_header(header))
        files.update(dict.fromkeys(header.tensors, (path, header)))
    return classify(table, {}, _numbers(files), ProbeResult(path=str(folder)))


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
    files: dict[str, tuple[Path, SafetensorsHeader]] = {}
    for component, adapter in components.items():
        weights = _peft_weights(adapter, f"{component}/")
        header = read_header(weights)
        table.update({f"{component}.{k}": v for k, v in table_from_header(header).items()})
        metadata.update(header.metadata)
        config.update({f"{component}.{k}": v for k, v in read_json_object(adapter / PEFT_CONFIG).items()})
        files[component] = (weights, header)

    def scalar(key: str) -> float:
        component, _, name = key.partition(".")
        path, header = files[component]
        return read_number(path, header, name)

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
    if suffix in SAFETENSORS_SUFFIXES:
        return _probe_safetensors(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
    if suffix == GGUF_SUFFIX or head.startswith(b"GGUF"):
        return _probe_gguf(path)
    from adapterzoo.formats.io.pickle_safe import PICKLE_SUFFIXES

    if suffix in PICKLE_SUFFIXES:
        return _probe_pickle(path)
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return _probe_pickle(path)
    return _probe_safetensors(path)
