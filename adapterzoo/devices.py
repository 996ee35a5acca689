"""Turn the --device option into a torch.device, so ops, verify and sample pick hardware the same way."""

from __future__ import annotations

import torch

from adapterzoo.errors import AdapterzooError

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def pick_device(name: str) -> torch.device:
    """auto prefers cuda, then mps, then cpu; an explicit accelerator that is absent is a user error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            build = "without CUDA" if torch.version.cuda is None else f"with CUDA {torch.version.cuda}"
            raise AdapterzooError(
                f"--device cuda: no CUDA device is available (torch {torch.__version__} built {build})")
        return torch.device("cuda")
    if name == "mps":
        if not _mps_available():
            raise AdapterzooError("--device mps: no Apple MPS device is available")
        return torch.device("mps")
    raise AdapterzooError(f"--device {name}: unknown device; use one of {', '.join(DEVICE_NAMES)}")
