"""Read and validate a safetensors header without touching tensor data (FORMATS.md §7)."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from adapterzoo.errors import BadFileError

MAX_HEADER_BYTES = 100_000_000

# Bits per element; sub-byte types are packed.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "F64": 64, "I64": 64, "U64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one tensor, with its byte range inside the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # where tensor data starts in the file: 8 + header length
    file_size: int


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise BadFileError(f"duplicate key {key!r} in safetensors header")
        out[key] = value
    return out


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise BadFileError(f"header entry for {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise BadFileError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadFileError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise BadFileError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    expected = math.ceil(info.numel * DTYPE_BITS[dtype] / 8)
    if info.end - info.begin != expected:
        raise BadFileError(
            f"tensor {name!r} claims {info.end - info.begin} bytes but {dtype}{list(shape)} needs {expected}"
        )
    return info


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header: offsets inside the file, no holes or overlaps, known dtypes."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise BadFileError(f"file is {file_size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES:
            raise BadFileError(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + header_len > file_size:
            raise BadFileError(f"header length {header_len} runs past the end of the {file_size}-byte file")
        raw = fh.read(header_len)
    if not raw.startswith(b"{"):
        raise BadFileError("header does not start with a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFileError(f"header is not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise BadFileError("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise BadFileError("__metadata__ must map strings to strings")

    tensors = {name: _tensor_info(name, entry) for name, entry in header.items()}
    data_offset = 8 + header_len
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            problem = "overlaps another tensor" if info.begin < position else "leaves a hole before it"
            raise BadFileError(f"tensor {name!r} {problem} in the data section")
        position = info.end
    held = file_size - data_offset
    if held < position:
        raise BadFileError(f"file is truncated: its tensors need {position} bytes of data but only {held} are there")
    if held > position:
        raise BadFileError(f"{held - position} stray bytes after the last tensor (the header does not describe them)")
    return SafetensorsHeader(tensors, metadata, data_offset, file_size)
