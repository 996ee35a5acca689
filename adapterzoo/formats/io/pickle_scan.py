"""List the globals a torch pickle would import, reading its opcodes and never running them (picklescan's idea).

This names what a refused file wanted, whatever its protocol or container: torch zip (every `.pkl`
member), the pre-1.6 legacy stream (pickles back to back), torch's pre-0.4 tar format, a raw pickle,
and torch files or pickles nested as bytes inside any of these. The restricted unpickler is what
keeps code from running; this scan only explains the refusal.
"""

from __future__ import annotations

import _compat_pickle
import io
import mmap
import os
import pickletools
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

ZIP_MAGIC = b"PK\x03\x04"
UNRESOLVED = "a global whose name is computed at load time"
LEGACY_PICKLES = 5  # magic number, protocol, sys info, the object, storage keys; raw storage bytes follow
_NESTED_DEPTH = 3
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_BYTES_OPS = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}
_NO_PUSH = {"MEMOIZE", "FRAME", "PROTO", *_MEMO_PUTS}


def python3_name(module: str, name: str) -> str:
    """The global as Python 3 imports it: protocol 0-2 pickles may use Python 2 names (`__builtin__`)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _embedded(value: str | bytes) -> bytes | None:
    """The bytes of a pickle or zip carried as a constant (protocol 2 keeps bytes as latin-1 text)."""
    data = value.encode("latin-1", "ignore") if isinstance(value, str) else bytes(value)
    return data if data[:1] == b"\x80" or data.startswith(ZIP_MAGIC) else None


def _scan_one(stream: IO[bytes], depth: int) -> tuple[list[str], bool]:
    """Globals of the pickle at the stream's position, and whether it reached STOP."""
    names: list[str] = []
    pushed: list[str | None] = []  # string value of each push, None for anything else
    memo: dict[int, str | None] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                names.append(python3_name(*str(arg).split(" ", 1)))
            elif name == "STACK_GLOBAL":
                module, attr = ([None, None] + pushed)[-2:]
                names.append(python3_name(module, attr) if module is not None and attr is not None else UNRESOLVED)
            elif name.startswith("EXT"):
                names.append(f"copyreg extension {arg}")
            if name == "STOP":
                return names, True
            if name in _MEMO_PUTS:
                memo[arg] = pushed[-1] if pushed else None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif name in _MEMO_GETS:
                pushed.append(memo.get(arg))
            elif name in _STRING_OPS:
                pushed.append(arg)
            elif name not in _NO_PUSH:
                pushed.append(None)
            if (name in _STRING_OPS or name in _BYTES_OPS) and depth < _NESTED_DEPTH and (inner := _embedded(arg)):
                names.extend(scan_bytes(inner, depth + 1))
    except Exception:  # noqa: BLE001 - a broken stream ends the scan; what was seen so far still counts
        pass
    return names, False


def _scan_stream(stream: IO[bytes], depth: int, pickles: int) -> list[str]:
    """Globals of up to `pickles` pickles back to back (legacy torch files are several)."""
    names: list[str] = []
    for _ in range(pickles):
        found, complete = _scan_one(stream, depth)
        names.extend(found)
        if not complete:
            break
    return names


def _scan_zip(archive: zipfile.ZipFile, depth: int) -> list[str]:
    names: list[str] = []
    for member in archive.namelist():
        if member.endswith(".pkl"):
            with archive.open(member) as fh:
                names.extend(_scan_stream(fh, depth, 1))
    return names


def _scan_tar(archive: tarfile.TarFile, depth: int) -> list[str]:
    """torch < 0.4 kept `sys_info`, `pickle`, `storages` and `tensors` members, each starting with pickles."""
    names: list[str] = []
    for member in archive.getmembers():
        fh = archive.extractfile(member) if member.isfile() else None
        if fh is not None:
            names.extend(_scan_stream(fh, depth, LEGACY_PICKLES))
    return names


def _scan_archive(fh: IO[bytes], depth: int) -> list[str] | None:
    """Globals of a zip or tar archive's pickles; None if the file is neither.

    A zip is what starts with its magic, as torch.load decides: a pickle carrying a zip as bytes
    near its end would pass zipfile.is_zipfile."""
    try:
        if fh.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
            with zipfile.ZipFile(fh) as archive:
                return _scan_zip(archive, depth)
    except Exception:  # noqa: BLE001 - a zip whose directory is unreadable: scan it as a stream
        pass
    fh.seek(0)
    try:
        with tarfile.open(fileobj=fh, mode="r:") as archive:
            return _scan_tar(archive, depth)
    except Exception:  # noqa: BLE001 - not a tar
        return None


def scan_bytes(data: bytes, depth: int = 0) -> list[str]:
    """Globals named by a pickle or torch file held in memory."""
    stream = io.BytesIO(data)
    found = _scan_archive(stream, depth)
    return found if found is not None else _scan_stream(io.BytesIO(data), depth, LEGACY_PICKLES)


def scan_file(path: str | os.PathLike) -> list[str]:
    """Globals named anywhere in the file, in the order met; a stream is mapped, never read whole."""
    with open(Path(path), "rb") as fh:
        found = _scan_archive(fh, 0)
        if found is not None or os.fstat(fh.fileno()).st_size == 0:
            return found or []
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _scan_stream(mapped, 0, LEGACY_PICKLES)  # type: ignore[arg-type]


def unique(names: Iterable[str]) -> list[str]:
    """Names once each, first seen first."""
    return list(dict.fromkeys(names))
