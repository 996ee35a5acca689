"""Probe textual-inversion embeddings (FORMATS.md §4) and A1111 hypernetworks (§3); their base is asked of the
model families, from the vectors' widths per text-encoder slot and the hypernetwork's context widths."""

from __future__ import annotations

import re
from typing import Any

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import FRIENDLY_DTYPE, TensorTable, table_from_state_dict
from adapterzoo.formats.model.registry import families, first

ENCODER_SLOTS = ("clip_l", "clip_g", "t5xxl")  # text-encoder slots of kohya's and ComfyUI's embeddings
# Our safetensors hypernetwork layout: "<width>.<0 for k, 1 for v>.linear.<i>.<weight|bias>".
SAFETENSORS_HYPERNETWORK_KEY = re.compile(r"^(\d+)\.([01])\.linear\d*(\.\d+)?\.(weight|bias)$")
_MODULE_SUFFIXES = (".weight", ".bias", ".alpha", "position_ids")


def embedding_base(slots: dict[str, int]) -> str:
    """The base whose text encoders take vectors this wide in these slots ("" for one unnamed encoder)."""
    return first(family.embedding_base(slots) for family in families()) or "unknown"


def _set_embedding(result: ProbeResult, fmt: str, vectors: int, width: int, base: str) -> None:
    result.kind, result.format, result.base = "embedding", fmt, base
    result.details.update(vectors=vectors, dim=width)


def _rows(shape: tuple[int, ...]) -> int:
    return 1 if len(shape) == 1 else shape[0]


def probe_embedding_table(table: TensorTable, result: ProbeResult) -> bool:
    """kohya `emb_params`, `clip_l`/`clip_g` pairs, ComfyUI slots with `t5xxl`, or a diffusers `{token: vector}`."""
    keys = set(table)
    if not keys or any(len(m.shape) not in (1, 2) for m in table.values()):
        return False
    if keys == {"emb_params"}:
        meta = table["emb_params"]
        _set_embedding(result, "kohya", _rows(meta.shape), meta.shape[-1], embedding_base({"": meta.shape[-1]}))
        return True
    if "t5xxl" in keys and keys <= set(ENCODER_SLOTS):  # ComfyUI's per-encoder slots (FLUX.md §3.5)
        slots = {slot: table[slot].shape[-1] for slot in ENCODER_SLOTS if slot in keys}
        _set_embedding(result, "kohya", _rows(table["t5xxl"].shape), sum(slots.values()), embedding_base(slots))
        result.details["slots"] = slots
        return True
    if keys == {"clip_l", "clip_g"}:
        n_l, n_g = _rows(table["clip_l"].shape), _rows(table["clip_g"].shape)
        slots = {slot: table[slot].shape[-1] for slot in ("clip_l", "clip_g")}
        _set_embedding(result, "kohya", n_l, sum(slots.values()), embedding_base(slots))
        if n_l != n_g:
            result.warnings.append(f"clip_l has {n_l} vectors but clip_g has {n_g}; loaders refuse this")
        return True
    widths = {m.shape[-1] for m in table.values()}
    if len(keys) <= 16 and len(widths) == 1 and not any(k.endswith(_MODULE_SUFFIXES) for k in keys):
        width = widths.pop()
        _set_embedding(result, "diffusers", sum(_rows(m.shape) for m in table.values()), width,
                       embedding_base({"": width}))
        result.details["tokens"] = sorted(keys)
        return True
    return False


def probe_a1111_embedding(obj: Any, result: ProbeResult) -> bool:
    """A1111 `.pt`: string_to_param {"*": [n, dim]} (an nn.ParameterDict in the oldest files)."""
    if not isinstance(obj, dict) or "string_to_param" not in obj:
        return False
    import torch  # the pickle was loaded by torch already
    params = obj["string_to_param"]
    if hasattr(params, "parameters"):
        params = params.parameters()
    if not isinstance(params, dict):
        return False
    tensors = [v for v in params.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return False
    vector = tensors[0]
    width = vector.shape[-1]
    _set_embedding(result, "a1111", 1 if vector.dim() == 1 else vector.shape[0], width, embedding_base({"": width}))
    result.dtype = FRIENDLY_DTYPE.get(table_from_state_dict({"v": vector})["v"].dtype)
    result.tensors = len(tensors)
    for key in ("name", "step", "sd_checkpoint", "sd_checkpoint_name"):
        if obj.get(key) is not None:
            result.details[key] = obj[key]
    return True


def _hypernetwork_widths(obj: dict) -> dict[int, list]:
    return {k: v for k, v in obj.items() if isinstance(k, int) and isinstance(v, (list, tuple))}


def probe_a1111_hypernetwork(obj: Any, result: ProbeResult) -> bool:
    """A1111 `.pt`: int context widths -> (k, v) Sequential state dicts plus structure fields."""
    if not isinstance(obj, dict):
        return False
    layers = _hypernetwork_widths(obj)
    if not layers or not all(isinstance(sd, dict) for pair in layers.values() for sd in pair):
        return False
    tensors = {f"{w}.{i}.{k}": t for w, pair in layers.items() for i, sd in enumerate(pair) for k, t in sd.items()}
    table = table_from_state_dict(tensors)
    _set_hypernetwork(result, sorted(layers), "a1111", table)
    for key in ("name", "step", "layer_structure", "activation_func", "is_layer_norm", "use_dropout",
                "activate_output", "weight_initialization", "sd_checkpoint_name"):
        if obj.get(key) is not None:
            result.details[key] = obj[key]
    return True


def probe_safetensors_hypernetwork(table: TensorTable, metadata: dict[str, str], result: ProbeResult) -> bool:
    matches = [SAFETENSORS_HYPERNETWORK_KEY.match(k) for k in table]
    if not table or not all(matches):
        return False
    _set_hypernetwork(result, sorted({int(m.group(1)) for m in matches}), "safetensors", table)
    return True


def _set_hypernetwork(result: ProbeResult, widths: list[int], fmt: str, table: TensorTable) -> None:
    result.kind, result.format = "hypernetwork", fmt
    result.details["widths"] = widths
    result.tensors = len(table)
    result.base = first(family.hypernetwork_base(widths) for family in families()) or "unknown"

