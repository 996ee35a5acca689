"""The checkpoint's own renders and noise predictions, kept on disk between runs.

A library verified again after it grew pays only for its new files: what the checkpoint alone renders is the
same for every file, so it is stored under a digest of everything that changes it (the checkpoint's SHA-256,
prompt, seed, size, steps, sampler, guidance, dtypes, device, versions) and read back instead of rendered.
Entries are safetensors files written atomically; one that cannot be read is rendered again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adapterzoo.formats.io.atomic import atomic_output


def _entry(folder: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return folder / digest[:2] / f"{digest}.safetensors"


class BaselineCache:
    """Tensors by key (a JSON-able dict) in `folder`; None for no cache (every baseline computed)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.hits = 0

    def get(self, key: Callable[[], dict[str, Any]], compute: Callable[[], dict[str, torch.Tensor]]
            ) -> dict[str, torch.Tensor]:
        """The cached tensors of `key()` (asked only when there is a cache: it may hash the checkpoint), or
        `compute()`'s, stored for the next run."""
        if self.folder is None:
            return compute()
        path = _entry(self.folder, key())
        if path.is_file():
            try:
                found = load_file(path)
                self.hits += 1
                return found
            except (SafetensorError, OSError):
                pass
        tensors = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(path) as tmp:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        except OSError:
            pass  # a read-only home: the run goes on, uncached
        return tensors
