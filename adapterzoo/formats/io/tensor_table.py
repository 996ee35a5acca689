"""Shapes and dtypes of a state dict, whether read from a safetensors header or a loaded pickle.

Plain Python: only a pickle's tensors (already loaded by torch) bring torch in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.safetensors_header import SafetensorsHeader

if TYPE_CHECKING:
    import torch

_TORCH_DTYPE_NAMES = {  # torch's dtype names -> the safetensors spelling
    "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float32": "F32", "torch.float64": "F64",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8", "torch.uint8": "U8",
    "torch.bool": "BOOL", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
}
FRIENDLY_DTYPE = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64", "F8_E4M3": "fp8", "F8_E5M2": "fp8"}


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F16, BF16, F32, ...

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


TensorTable = dict[str, TensorMeta]


def table_from_header(header: SafetensorsHeader) -> TensorTable:
    return {name: TensorMeta(info.shape, info.dtype) for name, info in header.tensors.items()}


def table_from_state_dict(state_dict: dict) -> TensorTable:
    """Tensors only; bookkeeping values (global_step, epoch) are skipped."""
    import torch

    return {
        str(name): TensorMeta(tuple(value.shape), _TORCH_DTYPE_NAMES.get(str(value.dtype), str(value.dtype)))
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor)
    }


def one_number(key: str, tensor: torch.Tensor) -> float:
    """The value of a scalar tensor (an alpha, a scale): any other shape or type there is a broken file, not a crash."""
    if tensor.numel() != 1:
        raise BadFileError(f"{key} should hold one number but holds {tensor.numel()}")
    try:
        if tensor.is_complex():
            raise TypeError
        return float(tensor.float().item())
    except (TypeError, RuntimeError, NotImplementedError):  # e.g. fp4, which torch cannot convert
        raise BadFileError(f"{key} should hold one real number but is stored as {tensor.dtype}") from None


def dominant_dtype(table: TensorTable) -> str | None:
    """The floating dtype holding most elements (fp16 UNet + fp32 VAE reads as fp16)."""
    weights: dict[str, int] = {}
    for meta in table.values():
        if meta.dtype in FRIENDLY_DTYPE:
            weights[meta.dtype] = weights.get(meta.dtype, 0) + meta.numel
    if not weights:
        return None
    return FRIENDLY_DTYPE[max(weights, key=weights.__getitem__)]
