"""Write outputs so a user never sees half a file: temp path beside the target, rename when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterzoo.errors import AdapterzooError


FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".json", ".png", ".jpg", ".jpeg",
                 ".webp", ".zip")  # a folder named like this would be taken for a file by every tool


def check_output(dest: str | os.PathLike, inputs: list[str | os.PathLike], force: bool, folder: bool = False,
                 suffix: str | None = None) -> Path:
    """Every writing command's check, before any work: never an input (or a folder holding one, or a path inside
    an input folder), even with --force; an existing output only with --force; its folder must exist; a folder
    output is not named like a file; an output of one format (`suffix`) is named so."""
    dest = Path(dest)
    target = dest.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source:
            raise AdapterzooError(f"output {dest} is one of the inputs; refusing to overwrite it")
        if source.is_relative_to(target):
            raise AdapterzooError(f"output {dest} would replace the folder holding the input {source}")
        if source.is_dir() and target.is_relative_to(source):
            raise AdapterzooError(f"output {dest} is inside the input folder {source}; refusing to write there")
    if dest.exists() and not force:
        raise AdapterzooError(f"{dest} already exists; pass --force to replace it")
    if not dest.parent.is_dir():
        raise AdapterzooError(f"folder {dest.parent} does not exist (output {dest})")
    if folder and dest.suffix.lower() in FILE_SUFFIXES:
        raise AdapterzooError(f"output {dest} is written as a folder; name it without {dest.suffix}")
    if suffix and dest.suffix.lower() != suffix:
        raise AdapterzooError(f"output {dest} is written as {suffix[1:].upper()}; name it *{suffix}")
    return dest


@contextmanager
def atomic_output(dest: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path in dest's folder; it replaces dest only if the block completes."""
    dest = Path(dest)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
        # Hand over a name, not a file: writers create it fresh. Reopening an existing file with O_TRUNC makes
        # ext4 flush it all to disk at close (auto_da_alloc), which costs seconds for a checkpoint.
        tmp.unlink()
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod((0o777 if tmp.is_dir() else 0o666) & ~umask)  # mkstemp's 0600 is for the temp name only
        if folder and dest.is_dir():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
