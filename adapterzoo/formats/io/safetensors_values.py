"""The few numbers probe reads from a safetensors file (a LoRA's alphas), decoded straight from their bytes.

A header read never maps or loads tensor data: each number is one seek and a read of a few bytes, so
probing a file larger than the machine's memory reads kilobytes and imports no torch.
"""

from __future__ import annotations

import math
import os
import struct

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.safetensors_header import SafetensorsHeader

_STRUCT = {"F64": "<d", "F32": "<f", "F16": "<e", "I64": "<q", "I32": "<i", "I16": "<h", "I8": "<b",
           "U64": "<Q", "U32": "<I", "U16": "<H", "U8": "<B", "BOOL": "<?"}
# 8-bit floats: (exponent bits, mantissa bits, bias, IEEE-style inf/NaN at the top exponent)
_FLOAT8 = {"F8_E4M3": (4, 3, 7, False), "F8_E5M2": (5, 2, 15, True)}


def read_number(path: str | os.PathLike, header: SafetensorsHeader, key: str) -> float:
    """The value of the one-element tensor `key` (an alpha, a scale); any other size or a type that holds no
    real number is a broken file, said in one line."""
    info = header.tensors[key]
    if info.numel != 1:
        raise BadFileError(f"{key} should hold one number but holds {info.numel}")
    with open(path, "rb") as fh:
        fh.seek(header.data_offset + info.begin)
        raw = fh.read(info.end - info.begin)
    if len(raw) != info.end - info.begin:
        raise BadFileError(f"{key} lies past the end of the file; was it changed while being read?")
    return _decode(key, info.dtype, raw)


def _decode(key: str, dtype: str, raw: bytes) -> float:
    if dtype in _STRUCT:
        return float(struct.unpack(_STRUCT[dtype], raw)[0])
    if dtype == "BF16":  # the upper half of a float32
        return struct.unpack("<f", b"\0\0" + raw)[0]
    if dtype in _FLOAT8:
        return _float8(raw[0], *_FLOAT8[dtype])
    raise BadFileError(f"{key} should hold one real number but is stored as {dtype}")


def _float8(byte: int, exponent_bits: int, mantissa_bits: int, bias: int, ieee: bool) -> float:
    sign = -1.0 if byte >> 7 else 1.0
    exponent = (byte >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = byte & ((1 << mantissa_bits) - 1)
    top = (1 << exponent_bits) - 1
    if exponent == top and (ieee or mantissa == (1 << mantissa_bits) - 1):
        return math.nan if mantissa or not ieee else sign * math.inf
    if exponent == 0:
        return sign * mantissa / (1 << mantissa_bits) * 2.0 ** (1 - bias)
    return sign * (1 + mantissa / (1 << mantissa_bits)) * 2.0 ** (exponent - bias)
