"""Where and how wide tensor work runs: the --device option as a torch.device, and torch's CPU threads.

Shared by ops, verify and sample so they pick hardware the same way. torch is imported only inside the
functions: the command line sets OpenMP's wait policy through this module before anything imports torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from adapterzoo.errors import AdapterzooError

if TYPE_CHECKING:
    import torch

DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def pick_device(name: str) -> torch.device:
    """auto prefers cuda, then mps, then cpu; an explicit accelerator that is absent is a user error."""
    import torch

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


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def cpu_threads(requested: int | None = None) -> int:
    """torch's intra-op CPU threads: `requested` (--threads N), else OMP_NUM_THREADS, else the usable cores.
    (merge then leaves one of them to its hashing thread while that runs.)"""
    if requested is not None:
        if requested < 1:
            raise AdapterzooError(f"--threads must be at least 1, got {requested}")
        return requested
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return usable_cores()


def use_cpu_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads as `cpu_threads` decides; returns the count."""
    import torch

    threads = cpu_threads(requested)
    torch.set_num_threads(threads)
    return threads


def quiet_openmp_waits() -> None:
    """Let idle OpenMP workers sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE) unless the user chose. With
    other programs busy on the cores, spinning workers wait on one that is not running: a tiny `verify` took
    92 s instead of 1.3 s. OpenMP reads this once, when torch loads it, so call it before anything imports torch."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
