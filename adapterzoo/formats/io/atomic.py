"""Write outputs so a user never sees half a file: temp path beside the target, rename when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterzoo.errors import AdapterzooError


def check_output(dest: str | os.PathLike, inputs: list[str | os.PathLike], force: bool) -> Path:
    """Refuse to overwrite an input ever, or an existing output without --force."""
    dest = Path(dest)
    for source in inputs:
        if dest.resolve() == Path(source).resolve():
            raise AdapterzooError(f"output {dest} is one of the inputs; refusing to overwrite it")
    if dest.exists() and not force:
        raise AdapterzooError(f"{dest} already exists; pass --force to replace it")
    if not dest.parent.is_dir():
        raise AdapterzooError(f"folder {dest.parent} does not exist")
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
