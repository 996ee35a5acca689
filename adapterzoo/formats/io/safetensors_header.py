"""Read and validate a safetensors header without touching tensor data (FORMATS.md §7)."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.file_start import describe_start

MAX_HEADER_BYTES = 100_000_000
GGUF_MAGIC = b"GGUF"  # llama.cpp's format: quantised weights read by probe alone (io.gguf_header)
U64_LIMIT = 2**64

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
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise BadFileError(f"duplicate key {duplicate!r} in safetensors header")
    return out


def _reject_constant(name: str) -> None:
    raise BadFileError(f"header holds {name}, which is not JSON")


def _is_size(value: object) -> bool:
    """A JSON integer that fits the u64 safetensors reads sizes into (bool is an int in Python, not in JSON)."""
    return type(value) is int and 0 <= value < U64_LIMIT


def _numel(shape: list[int]) -> int | None:
    """Element count, or None where safetensors' checked u64 product would overflow (even on the way to a 0)."""
    count = 1
    for dim in shape:
        count *= dim
        if count >= U64_LIMIT:
            return None
    return count


def _tensor_info(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise BadFileError(f"header entry for {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise BadFileError(f"tensor {name!r} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise BadFileError(f"tensor {name!r} has an invalid shape {_short(shape)}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise BadFileError(f"tensor {name!r} has invalid data_offsets {_short(offsets)}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    numel = _numel(shape)
    if numel is None or numel * DTYPE_BITS[dtype] >= U64_LIMIT:
        raise BadFileError(f"tensor {name!r} has shape {_short(shape)} and dtype {dtype}: too large to address")
    if numel * DTYPE_BITS[dtype] % 8:
        raise BadFileError(f"tensor {name!r} of {numel} {dtype} values does not end on a byte boundary")
    expected = numel * DTYPE_BITS[dtype] // 8
    if info.end - info.begin != expected:
        raise BadFileError(
            f"tensor {name!r} claims {info.end - info.begin} bytes but {dtype}{_short(shape)} needs {expected}"
        )
    return info


@contextmanager
def safetensors_errors(path: str | os.PathLike) -> Iterator[None]:
    """safetensors' own refusals while reading tensors (a dtype torch has no type for, like F6_E2M3; a file
    changed after its header was checked) as our one-line error."""
    try:
        yield
    except SafetensorError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "refused"
        raise BadFileError(f"{Path(path).name}: safetensors cannot read it: {reason}") from None


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header: offsets inside the file, no holes or overlaps, known dtypes. Its errors
    start with the file's name, so every command that reads one says which file it is about."""
    path = Path(path)
    try:
        return _read_header(path)
    except BadFileError as exc:
        raise type(exc)(f"{path.name}: {exc}") from None


def _read_header(path: Path) -> SafetensorsHeader:
    file_size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if prefix.startswith(GGUF_MAGIC):
            raise BadFileError("a quantised GGUF: its weights cannot be changed exactly; merge into "
                               "(or convert) the unquantised file")
        head = prefix + fh.read(8)
        fh.seek(8)
        if len(prefix) < 8:
            raise BadFileError(f"file is {file_size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or (8 + header_len > file_size and head[8:9] != b"{"):
            raise BadFileError(f"not a safetensors file (it {describe_start(head)})")
        if 8 + header_len > file_size:
            raise BadFileError(f"header length {header_len} runs past the end of the {file_size}-byte file "
                               "(truncated?)")
        raw = fh.read(header_len)
    if not raw.startswith(b"{"):
        raise BadFileError("header does not start with a JSON object")
    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, or a huge number
        raise BadFileError(f"header is not valid UTF-8 JSON ({exc.__class__.__name__})") from None
    if "\\u" in text:
        _reject_lone_surrogates(header)
    if not isinstance(header, dict):
        raise BadFileError("header is not a JSON object")

    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
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


def _reject_lone_surrogates(header: object) -> None:
    """Python reads a lone \\ud800 escape into a string; JSON text cannot hold one, and safetensors refuses it."""
    try:
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadFileError("header holds a lone UTF-16 surrogate escape, which is not valid JSON text") from None


def _short(value: object) -> str:
    """A value from the header for a one-line message, however large the file made it."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
