"""Load torch pickles (.pt .ckpt .bin .pth) without ever running code from them (FORMATS.md §7).

Everything goes through torch's `weights_only` unpickler, or, for the protocol 3-5 opcodes it does
not take, through the stdlib unpickler restricted to the same allowlist. The few extra classes real
A1111 and Lightning files reference are mapped to inert stand-ins that only hold their state, so
nothing from the file's own namespace is imported or called. A refused file is named by what it
would import (pickle_scan).
"""

from __future__ import annotations

import os
import pickle
import tarfile
import types
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterzoo.errors import BadFileError, UnsafeFileError
from adapterzoo.formats.io.file_start import describe_start
from adapterzoo.formats.io.pickle_scan import ZIP_MAGIC, python3_name, scan_file, unique

if TYPE_CHECKING:
    import torch

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


def allowed_globals() -> dict[str, Any]:
    """torch's weights-only allowlist plus our inert stand-ins: every global a file may import."""
    from torch import _weights_only_unpickler

    return {**_weights_only_unpickler._get_allowed_globals(), **{name: obj for obj, name in _extra_globals()}}


class _Refused(pickle.UnpicklingError):
    """The restricted unpickler met a global outside the allowlist (and did not import it)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name}")
        self.name = name


class RestrictedUnpickler(pickle._Unpickler):
    """The stdlib unpickler (every protocol's opcodes) whose only way to code, find_class, is the allowlist.

    The pure-Python one: its memo is a dict, where the C unpickler sizes an array by the largest
    memo index a file names (a flipped byte asked it for gigabytes)."""

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._allowed = allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        full = python3_name(module, name)
        found = self._allowed.get(full)
        if found is None:
            raise _Refused(full)
        return found


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(file, **kwargs).load()


# What torch.load calls a pickle module: it subclasses `Unpickler` (adding only storage handling) and
# calls `load` for the small pickles of a legacy file, so every global still goes through find_class.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    __name__="adapterzoo_restricted_pickle", Unpickler=RestrictedUnpickler, load=_restricted_load,
    UnpicklingError=pickle.UnpicklingError,
)


def _container(path: Path) -> str:
    """"zip" (torch >= 1.6), "tar" (torch < 0.4) or "stream" (legacy torch stream or a raw pickle)."""
    with open(path, "rb") as fh:
        if fh.read(len(ZIP_MAGIC)) == ZIP_MAGIC:  # the test torch.load itself makes
            return "zip"
        fh.seek(0)
        try:
            with tarfile.open(fileobj=fh, mode="r:"):
                return "tar"
        except Exception:  # noqa: BLE001 - anything tarfile cannot open is not torch's tar format
            return "stream"


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry code; torch.load would hand them to torch.jit.load."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except Exception:  # noqa: BLE001 - unreadable directory: torch's own reader decides below
        return False


def _load_with_allowlist(path: Path, container: str) -> Any:
    """torch's weights-only unpickler first; the restricted stdlib one for protocol 3-5 opcodes torch lacks.
    `container` is "zip" or "stream" (load_pickle never hands a tar here)."""
    import torch  # only here: recognising a pickle by its name never loads torch

    with warnings.catch_warnings(), torch.serialization.safe_globals(_extra_globals()):
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=container == "zip")
        except pickle.UnpicklingError as exc:
            if "Unsupported operand" not in str(exc):
                raise
        # torch's own reader got as far as unpickling, so this is no TorchScript archive; checked again all the
        # same, since torch.load without weights_only would hand one to torch.jit.load
        if container == "zip" and _is_torchscript(path):
            raise UnsafeFileError("a TorchScript archive carries code; refused, nothing was run")
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE,
                          mmap=container == "zip")


def _foreign_globals(path: Path) -> list[str]:
    """Globals the file would import beyond the allowlist, read statically (pickle_scan)."""
    allowed = allowed_globals()
    return [name for name in unique(scan_file(path)) if name not in allowed and not _is_storage_type(name)]


def _is_storage_type(name: str) -> bool:
    """torch.load maps every `torch.*Storage` name to an inert StorageType before any import."""
    return name.startswith("torch.") and name.endswith("Storage")


def _unsafe(names: list[str]) -> UnsafeFileError:
    return UnsafeFileError(f"unsafe pickle: it would import {', '.join(names[:5])}; refused, nothing was run")


def load_pickle(path: str | os.PathLike) -> Any:
    """Return the unpickled object, or raise UnsafeFileError / BadFileError with a one-line reason that starts
    with the file's name."""
    path = Path(path)
    try:
        return _load_pickle(path)
    except BadFileError as exc:
        raise type(exc)(f"{path.name}: {exc}") from None


def _load_pickle(path: Path) -> Any:
    if path.stat().st_size == 0:
        raise BadFileError("file is empty")
    container = _container(path)
    if container == "tar":
        foreign = _foreign_globals(path)
        if foreign:
            raise _unsafe(foreign)
        raise BadFileError("torch's legacy tar format (torch < 0.4) is not read; nothing was run")
    try:
        return _load_with_allowlist(path, container)
    except Exception as exc:
        foreign = _foreign_globals(path)
        if foreign or isinstance(exc, _Refused):
            raise _unsafe(foreign or [exc.name]) from None
        if isinstance(exc, BadFileError):
            raise
        with open(path, "rb") as fh:
            start = describe_start(fh.read(16))
        if not start.startswith(("starts with a zip", "starts with a pickle")):
            raise BadFileError(f"not a torch pickle (it {start})") from None
        raise BadFileError(f"not a readable torch pickle ({_reason(exc)})") from None


def _reason(exc: Exception) -> str:
    """The first line of torch's or pickle's complaint; a bare KeyError's text is only the key."""
    text = str(exc).split("WeightsUnpickler error:")[-1].strip()
    first = text.splitlines()[0][:160] if text else ""
    if isinstance(exc, (pickle.UnpicklingError, RuntimeError, ValueError)) and first:
        return first
    return f"{exc.__class__.__name__}: {first}" if first else exc.__class__.__name__


def unwrap_state_dict(obj: Any) -> Any:
    """Lightning and many A1111 files wrap weights as {"state_dict": {...}, ...}."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj
