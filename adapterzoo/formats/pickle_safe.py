"""Load torch pickles (.pt .ckpt .bin .pth) without ever running code from them (FORMATS.md §7).

Everything goes through torch's `weights_only` unpickler. The few extra classes real A1111 and
Lightning files reference are mapped to inert stand-ins that only hold their state, so nothing
from the file's own namespace is imported or called.
"""

from __future__ import annotations

import io
import os
import pickletools
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from adapterzoo.errors import BadFileError, UnsafeFileError

PICKLE_SUFFIXES = {".pt", ".ckpt", ".bin", ".pth"}


class InertObject:
    """Stand-in for an allowlisted foreign class: keeps the pickled state, has no behaviour."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


class InertParameterDict(InertObject):
    """The original textual_inversion repo stored `string_to_param` as an nn.ParameterDict."""

    def parameters(self) -> dict[str, torch.Tensor]:
        state = self.state if isinstance(self.state, dict) else {}
        params = state.get("_parameters") or {}
        return {str(k): v for k, v in params.items()}


class InertLightningCallback(InertObject):
    """Lightning `.ckpt` files may pickle their ModelCheckpoint callback next to the weights."""


def _numpy_globals() -> list[tuple[Any, str]]:
    try:
        import numpy as np
    except ImportError:
        return []
    # Allowlisted by A1111's safe unpickler; numpy rebuilds plain arrays from bytes here.
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: list[tuple[Any, str]] = [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((multiarray._reconstruct, f"{module}._reconstruct"))
        out.append((multiarray.scalar, f"{module}.scalar"))
    out.extend((type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}") for t in ("f4", "f8", "i8", "i4"))
    return out


def _extra_globals() -> list[Any]:
    import _codecs

    return [
        (InertParameterDict, "torch.nn.modules.container.ParameterDict"),
        (InertLightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (InertLightningCallback, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
        (_codecs.encode, "_codecs.encode"),
        *_numpy_globals(),
    ]


def _pickle_globals(data: bytes) -> list[str]:
    """Statically list the globals a raw pickle stream imports (picklescan's idea), never running it."""
    found: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    try:
        while stream.tell() < len(data):  # legacy torch files are several pickles back to back
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # noqa: BLE001 - a broken stream (or raw storage bytes) ends the scan
        pass
    return found


def _foreign_globals(path: Path) -> list[str]:
    """Globals the file would import beyond the weights-only allowlist and our inert stand-ins."""
    if zipfile.is_zipfile(path):
        try:
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:  # noqa: BLE001 - corrupt archive: the load error explains it
            names = []
    else:
        with open(path, "rb") as fh:
            names = _pickle_globals(fh.read(64 * 1024 * 1024))
    from torch import _weights_only_unpickler

    safe = _allowed_names() | set(_weights_only_unpickler._get_allowed_globals())
    return sorted({n for n in names if n not in safe})


def load_pickle(path: str | os.PathLike) -> Any:
    """Return the unpickled object, or raise UnsafeFileError / BadFileError with a one-line reason."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise BadFileError("file is empty")
    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_extra_globals()):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a one-line reason below
        foreign = _foreign_globals(path)
        if foreign:
            raise UnsafeFileError(
                f"unsafe pickle: it would import {', '.join(foreign[:5])}; refused, nothing was run"
            ) from None
        reason = _short(str(exc).split("WeightsUnpickler error:")[-1]) or exc.__class__.__name__
        raise BadFileError(f"not a readable torch pickle ({reason})") from None


def _allowed_names() -> set[str]:
    return {name for _, name in _extra_globals()}


def _short(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:160]


def unwrap_state_dict(obj: Any) -> Any:
    """Lightning and many A1111 files wrap weights as {"state_dict": {...}, ...}."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj
