"""Read a GGUF file's header (llama.cpp's format, city96's quantised ComfyUI transformers) without its tensor data.

A GGUF file is: magic `GGUF`, a version, the tensor and key/value counts, the key/values (typed: numbers,
strings, arrays), then for each tensor its name, dims (innermost first, as ggml counts them), quantisation
type and offset; the data follows, aligned. The `gguf` package's reader maps the whole file with numpy; this
reads the few kilobytes before the data with plain file I/O, so probing a 20 GB file costs what probing a
safetensors header does. ComfyUI-GGUF records a tensor's shape before it was flattened for quantisation under
`comfy.gguf.orig_shape.<name>`; that shape is the one reported.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from adapterzoo.errors import BadFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts and is long gone
DEFAULT_ALIGNMENT = 32
ORIG_SHAPE = "comfy.gguf.orig_shape."
MAX_COUNT = 10_000_000  # tensors or key/values: a corrupt count is refused before anything is allocated
MAX_STRING = 64 * 2**20
MAX_DIMS = 8
# ggml's quantisation types (ggml.h, gguf-py's GGMLQuantizationType) -> (name, block size, bytes per block)
QUANT_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
UNQUANTISED = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")
# key/value types: number formats by type id; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GgufTensor:
    """One tensor: its shape (outermost first, as torch has it), quantisation type and byte range in the data."""

    shape: tuple[int, ...]
    quant: str
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GgufTensor]
    data_offset: int


def is_gguf(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC


class _Reader:
    def __init__(self, fh: BinaryIO, name: str) -> None:
        self.fh, self.name = fh, name

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise BadFileError(f"{self.name} ends inside its GGUF header (truncated?)")
        return data

    def number(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str) -> int:
        n = self.number("<Q")
        if n > MAX_COUNT:
            raise BadFileError(f"{self.name}: its GGUF header claims {n} {what}; not a GGUF file we read")
        return n

    def string(self) -> str:
        n = self.number("<Q")
        if n > MAX_STRING:
            raise BadFileError(f"{self.name}: a {n}-byte string in its GGUF header; not a GGUF file we read")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.number(_SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            inner, n = self.number("<I"), self.count("array items")
            return [self.value(inner) for _ in range(n)]
        raise BadFileError(f"{self.name}: unknown GGUF value type {kind}")


def _nbytes(name: str, dims: tuple[int, ...], quant: int, file: str) -> int:
    if quant not in QUANT_TYPES:
        raise BadFileError(f"{file}: tensor {name} has GGUF type {quant}, which we do not know")
    _, block, size = QUANT_TYPES[quant]
    return math.prod(dims) // block * size


def read_gguf_header(path: str | os.PathLike) -> GgufHeader:
    """The header; BadFileError for anything that is not a well-formed GGUF v2/v3 header within the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        reader = _Reader(fh, path.name)
        if reader.take(4) != MAGIC:
            raise BadFileError(f"{path.name} is not a GGUF file (no GGUF magic)")
        version = reader.number("<I")
        if version not in VERSIONS:
            raise BadFileError(f"{path.name}: GGUF version {version}; versions {VERSIONS} are read")
        n_tensors, n_values = reader.count("tensors"), reader.count("key/values")
        metadata = {}
        for _ in range(n_values):
            key = reader.string()
            metadata[key] = reader.value(reader.number("<I"))
        raw = []
        for _ in range(n_tensors):
            name = reader.string()
            n_dims = reader.number("<I")
            if n_dims > MAX_DIMS:
                raise BadFileError(f"{path.name}: tensor {name} has {n_dims} dimensions")
            dims = tuple(reader.number("<Q") for _ in range(n_dims))
            raw.append((name, dims, reader.number("<I"), reader.number("<Q")))
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise BadFileError(f"{path.name}: general.alignment is {alignment!r}")
        data_offset = -(-fh.tell() // alignment) * alignment
    tensors = {}
    for name, dims, quant, offset in raw:
        nbytes = _nbytes(name, dims, quant, path.name)
        if data_offset + offset + nbytes > size:
            raise BadFileError(f"{path.name}: tensor {name} lies past the end of the file (truncated?)")
        original = metadata.get(ORIG_SHAPE + name)
        shape = tuple(int(d) for d in original) if isinstance(original, list) else tuple(reversed(dims))
        tensors[name] = GgufTensor(shape, QUANT_TYPES[quant][0], offset, nbytes)
    return GgufHeader(version, metadata, tensors, data_offset)


def read_scalar(path: str | os.PathLike, header: GgufHeader, key: str) -> float:
    """The one number an unquantised one-element tensor holds (a LoRA's alpha)."""
    tensor = header.tensors[key]
    formats = {"F32": "<f", "F16": "<e", "F64": "<d", "I32": "<i", "I64": "<q"}
    if math.prod(tensor.shape) != 1 or tensor.quant not in formats:
        raise BadFileError(f"{key} should hold one unquantised number, but is {tensor.quant} {list(tensor.shape)}")
    with open(path, "rb") as fh:
        fh.seek(header.data_offset + tensor.offset)
        return float(struct.unpack(formats[tensor.quant], fh.read(tensor.nbytes))[0])
