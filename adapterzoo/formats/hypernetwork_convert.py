"""Convert A1111 hypernetworks between their pickled `.pt` and safetensors (FORMATS.md §3).

safetensors keys are `<width>.<0 for k, 1 for v>.<module key>` and the structure fields travel in
the metadata (strings as they are, everything else as JSON), so both directions copy every tensor
bit for bit. The `.pt` we write is what A1111's saver writes, and is checked against the layer
layout A1111 will build from its fields, because A1111 refuses a state dict that does not fit.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.embedding.probe_embedding import SAFETENSORS_HYPERNETWORK_KEY
from adapterzoo.formats.io.atomic import atomic_output, check_output
from adapterzoo.formats.io.pickle_safe import PICKLE_SUFFIXES, load_pickle
from adapterzoo.formats.io.probe_result import with_article
from adapterzoo.formats.io.safetensors_header import safetensors_errors
from adapterzoo.formats.probe import probe

HYPERNETWORK_TARGETS = ("safetensors", "a1111")
TEXT_FIELDS = ("name", "activation_func", "weight_initialization", "sd_checkpoint", "sd_checkpoint_name",
               "optional_info")
# What A1111's Hypernetwork.load assumes for a missing field, in its saver's order; "name" and the
# dropout fields depend on the others and are filled in `a1111_fields`.
A1111_DEFAULTS: dict[str, Any] = {
    "step": 0, "name": None, "layer_structure": [1, 2, 1], "activation_func": None, "is_layer_norm": False,
    "weight_initialization": "Normal", "sd_checkpoint": None, "sd_checkpoint_name": None,
    "activate_output": True, "use_dropout": None, "dropout_structure": None, "last_layer_dropout": None,
    "optional_info": None,
}
OLD_KEYS = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
            "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
NO_ACTIVATION = (None, "linear")

Module = dict[str, torch.Tensor]


@dataclass
class Hypernetwork:
    """Context width -> (k module, v module) state dicts, plus the non-tensor fields of the `.pt`."""

    layers: dict[int, tuple[Module, Module]]
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def tensor_count(self) -> int:
        return sum(len(module) for pair in self.layers.values() for module in pair)


def _module(state: Any, where: str) -> Module:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadFileError(f"hypernetwork {where} is not a state dict of tensors")
    for key in state:
        if not SAFETENSORS_HYPERNETWORK_KEY.match(f"0.0.{key}"):
            raise BadFileError(f"hypernetwork {where} holds {key!r}; A1111 modules hold only linear layers")
    return {str(k): v.detach().clone().contiguous() for k, v in state.items()}


def _read_a1111(path: Path) -> Hypernetwork:
    obj = load_pickle(path)
    layers: dict[int, tuple[Module, Module]] = {}
    fields: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(key, int):
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise BadFileError(f"hypernetwork width {key} does not hold a (k, v) pair of modules")
            layers[key] = (_module(value[0], f"width {key} k"), _module(value[1], f"width {key} v"))
        else:
            fields[str(key)] = value
    return Hypernetwork(layers, fields)


def _decode(key: str, value: str) -> Any:
    if key in TEXT_FIELDS:
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _read_safetensors(path: Path) -> Hypernetwork:
    grouped: dict[int, tuple[Module, Module]] = {}
    with safetensors_errors(path), safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        for name in handle.keys():
            match = SAFETENSORS_HYPERNETWORK_KEY.match(name)
            width, side = int(match.group(1)), int(match.group(2))
            pair = grouped.setdefault(width, ({}, {}))
            pair[side][name[len(f"{width}.{side}."):]] = handle.get_tensor(name)
    return Hypernetwork(grouped, {k: _decode(k, v) for k, v in metadata.items()})


def read_hypernetwork(path: str | os.PathLike) -> tuple[Hypernetwork, str, str]:
    """The hypernetwork, its format (a1111 | safetensors) and its base."""
    path = Path(path)
    found = probe(path)
    if found.kind != "hypernetwork":
        raise BadFileError(f"{path.name} is {with_article(found.kind)}, not a hypernetwork")
    reader = _read_a1111 if found.format == "a1111" else _read_safetensors
    return reader(path), str(found.format), found.base


def _metadata(fields: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Strings stay strings, None text fields are left out, everything else is JSON."""
    metadata: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in fields.items():
        if key in TEXT_FIELDS:
            if value is not None:
                metadata[key] = str(value)
            continue
        try:
            metadata[key] = json.dumps(value)
        except (TypeError, ValueError):
            dropped.append(key)
    return metadata, dropped


def _dropout_structure(layer_structure: list, use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """A1111's parse_dropout_structure: 0.3 after hidden layers, the last one only if asked."""
    if not use_dropout:
        return [0] * len(layer_structure)
    return [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


def a1111_fields(fields: dict[str, Any], name: str) -> tuple[dict[str, Any], list[str]]:
    """Every field A1111's saver writes: the file's own, else what A1111 would assume when reading it."""
    filled = [key for key in A1111_DEFAULTS if key not in fields]
    out = {**A1111_DEFAULTS, **{k: v for k, v in fields.items() if k in A1111_DEFAULTS}}
    out["name"] = name if "name" not in fields else fields["name"]
    structure = fields.get("dropout_structure")
    if "use_dropout" not in fields:
        out["use_dropout"] = bool(structure and any(structure))
    if "last_layer_dropout" not in fields:
        out["last_layer_dropout"] = bool(structure[-2]) if structure and len(structure) > 1 else False
    if structure is None:
        out["dropout_structure"] = _dropout_structure(out["layer_structure"], out["use_dropout"],
                                                      out["last_layer_dropout"])
    out.update({k: v for k, v in fields.items() if k not in A1111_DEFAULTS})  # a fork's extra fields
    return out, filled


def _numbers(value: Any, what: str) -> list[float]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(x, (int, float)) for x in value):
        raise BadFileError(f"{what} {value!r} is not a list of numbers")
    return list(value)


def expected_shapes(width: int, fields: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The Sequential A1111's HypernetworkModule builds from the fields: parameter key -> shape."""
    layers = _numbers(fields["layer_structure"], "layer_structure")
    dropout = _numbers(fields["dropout_structure"], "dropout_structure")
    if len(layers) < 2 or len(dropout) != len(layers):
        raise BadFileError(f"layer_structure {layers} and dropout_structure {dropout} do not fit together")
    shapes: dict[str, tuple[int, ...]] = {}
    index = 0
    for i in range(len(layers) - 1):
        size_in, size_out = int(width * layers[i]), int(width * layers[i + 1])
        shapes[f"linear.{index}.weight"], shapes[f"linear.{index}.bias"] = (size_out, size_in), (size_out,)
        index += 1
        is_last = i >= len(layers) - 2
        if fields["activation_func"] not in NO_ACTIVATION and not (is_last and not fields["activate_output"]):
            index += 1
        if fields["is_layer_norm"]:
            shapes[f"linear.{index}.weight"], shapes[f"linear.{index}.bias"] = (size_out,), (size_out,)
            index += 1
        if dropout[i + 1] > 0:
            index += 1
    return shapes


def _check_layout(hypernetwork: Hypernetwork, fields: dict[str, Any]) -> None:
    for width, pair in hypernetwork.layers.items():
        expected = expected_shapes(width, fields)
        for side, module in zip("kv", pair):
            found = {OLD_KEYS.get(k, k): tuple(t.shape) for k, t in module.items()}
            if found != expected:
                wrong = sorted(set(found.items()) ^ set(expected.items()))[:3]
                raise BadFileError(
                    f"width {width} {side}: tensors do not fit layer_structure {fields['layer_structure']}, "
                    f"activation {fields['activation_func']}, layer norm {fields['is_layer_norm']} "
                    f"(differ at {', '.join(f'{k}{list(s)}' for k, s in wrong)}); A1111 could not load it"
                )


def _check_suffix(dest: Path, to: str) -> None:
    suffix = dest.suffix.lower()
    if to == "a1111" and suffix not in PICKLE_SUFFIXES:
        raise AdapterzooError(f"A1111 hypernetworks are .pt files; name the output .pt, not {dest.name}")
    if to == "safetensors" and suffix != ".safetensors":
        raise AdapterzooError(f"name the safetensors output .safetensors, not {dest.name}")


def convert_hypernetwork(
    src: str | os.PathLike, dest: str | os.PathLike, to: str, *, force: bool = False
) -> dict[str, Any]:
    """Rewrite a hypernetwork as `to` (safetensors | a1111), every tensor unchanged."""
    if to not in HYPERNETWORK_TARGETS:
        raise AdapterzooError(f"hypernetworks convert to {' | '.join(HYPERNETWORK_TARGETS)}, not {to!r}")
    src, dest = Path(src), Path(dest)
    _check_suffix(dest, to)
    hypernetwork, source_format, base = read_hypernetwork(src)
    check_output(dest, [src], force)
    report: dict[str, Any] = {"filled": [], "dropped": [], "warnings": []}
    if to == "a1111":
        fields, report["filled"] = a1111_fields(hypernetwork.fields, dest.stem)
        if "activate_output" in report["filled"]:
            report["warnings"].append("the source does not say activate_output; wrote A1111's assumption, True "
                                      "(ComfyUI assumes False for such files)")
        _check_layout(hypernetwork, fields)
        saved: dict[Any, Any] = {w: (OrderedDict(k), OrderedDict(v)) for w, (k, v) in hypernetwork.layers.items()}
        saved.update(fields)
        with atomic_output(dest) as tmp:
            torch.save(saved, tmp)
    else:
        metadata, report["dropped"] = _metadata(hypernetwork.fields)
        if report["dropped"]:
            report["warnings"].append(f"left out fields that are not JSON: {', '.join(report['dropped'])}")
        tensors = {f"{w}.{side}.{key}": t for w, pair in hypernetwork.layers.items()
                   for side, module in enumerate(pair) for key, t in module.items()}
        with atomic_output(dest) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    return {
        "input": str(src),
        "outputs": [str(dest)],
        "kind": "hypernetwork",
        "from": source_format,
        "to": to,
        "base": base,
        "widths": sorted(hypernetwork.layers),
        "tensors": hypernetwork.tensor_count,
        **report,
    }
