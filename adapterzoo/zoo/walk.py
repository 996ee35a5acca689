"""Find what `scan` indexes under a folder, reading names and stat results only (never writing).

A diffusers (model_index.json) or PEFT (adapter_config.json, at the top or in unet/, text_encoder/...)
folder is one entry and is not descended into; elsewhere, model files by suffix. Hidden files and
folders are skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from adapterzoo.formats.io.model_folders import is_model_folder

MODEL_SUFFIXES = frozenset({".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf"})
SKIPPED_SUFFIXES = frozenset({".optim", ".part"})  # optimizer states and unfinished downloads
SKIPPED_FOLDERS = frozenset({"__pycache__", "node_modules", "site-packages", "venv"})


@dataclass(frozen=True)
class Found:
    """A file or model folder on disk, with what a rescan compares and the names beside it."""

    path: Path
    is_folder: bool
    size: int
    mtime_ns: int
    neighbours: frozenset[str]  # names in its parent folder, for sidecar and preview lookups
    inode: int | None = None  # st_ino and st_dev as signed 64-bit numbers (what a BIGINT column holds):
    device: int | None = None  # the same pair, size and mtime after a rename say it is the same file


def is_model_file(name: str) -> bool:
    """A model file by its name: a model suffix last, no optimizer-state or download suffix, not hidden.
    Plain string work: a rescan asks it of every file in the library."""
    if name.startswith("."):
        return False
    suffixes = ["." + part for part in name.lower().split(".")[1:]]
    return bool(suffixes) and suffixes[-1] in MODEL_SUFFIXES and not SKIPPED_SUFFIXES.intersection(suffixes)


def signed64(number: int) -> int:
    """An unsigned 64-bit st_ino / st_dev as the signed number a database BIGINT holds."""
    return number - (1 << 64) if number >= 1 << 63 else number


def found_file(path: Path, stat: os.stat_result, neighbours: frozenset[str]) -> Found:
    return Found(path, False, stat.st_size, stat.st_mtime_ns, neighbours, signed64(stat.st_ino),
                 signed64(stat.st_dev))


def find_entries(root: Path) -> Iterator[Found]:
    """Every model file and model folder under `root` (or `root` itself), following folder links once."""
    if not root.is_dir():
        yield _file_entry(root, _listing(root.parent))
        return
    visited: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        stat = folder.stat()
        if (stat.st_dev, stat.st_ino) in visited:
            continue
        visited.add((stat.st_dev, stat.st_ino))
        if is_model_folder(folder):
            yield _folder_entry(folder)
            continue
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        names = frozenset(entry.name for entry in entries)
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    if entry.name not in SKIPPED_FOLDERS:
                        stack.append(Path(entry.path))
                elif entry.is_file() and is_model_file(entry.name):
                    yield found_file(folder / entry.name, entry.stat(), names)
            except OSError:  # a dangling link or a file removed while we walk
                continue


def _listing(folder: Path) -> frozenset[str]:
    try:
        return frozenset(os.listdir(folder))
    except OSError:
        return frozenset()


def _file_entry(path: Path, neighbours: frozenset[str]) -> Found:
    return found_file(path, path.stat(), neighbours)


def _folder_entry(folder: Path) -> Found:
    """A model folder changes when any file in it does: total size and newest mtime say so."""
    own = folder.stat()
    size, newest = 0, own.st_mtime_ns
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            try:
                stat = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            size += stat.st_size
            newest = max(newest, stat.st_mtime_ns)
    return Found(folder, True, size, newest, _listing(folder.parent), signed64(own.st_ino), signed64(own.st_dev))
