"""Write a safetensors file one tensor at a time, so converting a checkpoint holds one tensor, not two copies.

The header is computed up front from the planned shapes and dtypes; each tensor is produced only
when its turn comes. Tensors are laid out by element size, largest first, and the header is padded
to 8 bytes, so every tensor is aligned for zero-copy readers (the reference writer does the same).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.tensor_table import TensorMeta, dominant_dtype

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: its name, shape and dtype now, its data from `make()` when written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(
    path: str | os.PathLike, tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None
) -> int:
    """Write the planned tensors (cast to their planned dtype) to `path`; returns how many were written."""
    planned = sorted(tensors, key=lambda t: (-t.dtype.itemsize, t.name))
    header: dict[str, object] = {}
    offset = 0
    for item in planned:
        if item.dtype not in SAFETENSORS_DTYPES:
            raise AdapterzooError(f"tensor {item.name} has dtype {item.dtype}, which safetensors cannot store")
        header[item.name] = {
            "dtype": SAFETENSORS_DTYPES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for item in planned:
            tensor = item.make().to(item.dtype).contiguous()
            if tuple(tensor.shape) != item.shape:
                raise AdapterzooError(f"tensor {item.name} came out {list(tensor.shape)}, planned {list(item.shape)}")
            fh.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return len(planned)


def plan_dtype(tensors: Iterable[PlannedTensor]) -> str | None:
    """The floating dtype holding most elements of a plan, in probe's words (fp16, bf16, fp32)."""
    return dominant_dtype({t.name: TensorMeta(t.shape, SAFETENSORS_DTYPES[t.dtype]) for t in tensors})
