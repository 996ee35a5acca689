"""Large files read and written past the page cache (O_DIRECT) where the filesystem allows it.

Streaming a 20 GB checkpoint through the page cache costs more CPU than merging it: on the 2-core
development VM `dd` of 20 GB took 59 s of CPU buffered (allocating, writing back and reclaiming pages)
and 1.6 s with O_DIRECT both ways. Direct I/O moves whole aligned blocks between the disk and
page-aligned buffers; a filesystem that refuses it (tmpfs on older kernels, some FUSE) gets plain
buffered I/O. Small files keep the cache: it costs them little, and the next command may want them.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from pathlib import Path
from typing import BinaryIO

from adapterzoo.errors import BadFileError

ALIGN = 4096  # every block size a disk reports (512 or 4096) divides it
DIRECT_FROM_BYTES = 256 << 20
CHUNK_BYTES = 16 << 20
_REFUSED = {errno.EINVAL, errno.EOPNOTSUPP}  # "no direct I/O on this file"


def _aligned(nbytes: int) -> memoryview:
    """Zeroed page-aligned memory (an anonymous mapping), as direct I/O requires."""
    return memoryview(mmap.mmap(-1, max(nbytes, ALIGN)))


def _open(path: str | os.PathLike, flags: int, direct: bool) -> tuple[int, bool]:
    """(fd, whether it is direct): direct when asked and the filesystem takes it."""
    flags |= getattr(os, "O_CLOEXEC", 0)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o666), True
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
    return os.open(path, flags, 0o666), False


def _undirect(fd: int) -> None:
    """Turn a file descriptor's O_DIRECT off: the filesystem opened it but refuses the transfers."""
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)


class SpanReader:
    """Byte ranges of one file, each read into a reused page-aligned buffer and returned as a view of it
    (valid until the next `span`). `past_cache` is for a large file streamed through once (a merge, its
    SHA-256): read from the disk past the page cache. Otherwise the cache serves (TensorSource's reads never
    come here: verify loads a checkpoint again and again, and it should stay in memory). Asking the cache first
    with RWF_NOWAIT is no way to have both: a miss starts a buffered readahead of the same bytes."""

    def __init__(self, path: str | os.PathLike, past_cache: bool = False) -> None:
        self.path = Path(path)
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed with the reader, or when collected
        self.fd = self._file.fileno()
        self._direct: BinaryIO | None = None
        if past_cache and os.fstat(self.fd).st_size >= DIRECT_FROM_BYTES:
            fd, direct = _open(path, os.O_RDONLY, True)
            if direct:
                self._direct = os.fdopen(fd, "rb", buffering=0)
            else:
                os.close(fd)
        self._buffer = _aligned(0)

    def span(self, offset: int, nbytes: int, buffer: memoryview | None = None) -> memoryview:
        """Bytes [offset, offset + nbytes) of the file, in `buffer` (from `aligned_size`) or the reader's own."""
        start = offset - offset % ALIGN
        if buffer is None:
            if len(self._buffer) < aligned_size(offset, nbytes):
                self._buffer = _aligned(aligned_size(offset, nbytes))
            buffer = self._buffer
        wanted = buffer[offset - start:offset - start + nbytes]
        if self._direct is None:
            got = _read(self.fd, wanted, offset)
        else:
            got = self._read_direct(buffer, wanted, offset, start)
        if got < nbytes:
            raise BadFileError(f"{self.path.name} ends before byte {offset + nbytes}; was it changed while being read?")
        return wanted

    def _read_direct(self, buffer: memoryview, wanted: memoryview, offset: int, start: int) -> int:
        """Read `wanted` (`buffer` from `offset` on) from the disk in whole aligned blocks from `start`; through
        the cache after all if the filesystem refuses direct reads."""
        end = -(-(offset + len(wanted)) // ALIGN) * ALIGN
        try:
            return max(0, _read(self._direct.fileno(), buffer[:end - start], start) - (offset - start))
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
        self._direct.close()
        self._direct = None
        return _read(self.fd, wanted, offset)

    def close(self) -> None:
        self._file.close()
        if self._direct is not None:
            self._direct.close()

    def __enter__(self) -> SpanReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def aligned_size(offset: int, nbytes: int) -> int:
    """The aligned buffer a span of `nbytes` at `offset` needs: whole blocks from the one holding `offset`."""
    return -(-(offset + nbytes) // ALIGN) * ALIGN - (offset - offset % ALIGN)


class ReadAhead:
    """The bytes of a known sequence of (file, offset, nbytes) ranges, read by a thread of its own one range
    ahead of the caller, into two buffers in turn: the disk works while the caller computes on the last range."""

    def __init__(self, ranges: list[tuple[Path, int, int]]) -> None:
        self._ranges = ranges
        size = max((aligned_size(offset, nbytes) for _, offset, nbytes in ranges), default=ALIGN)
        self._free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(2):
            self._free.put(_aligned(size))
        self._ready: queue.Queue[tuple[memoryview, memoryview] | BaseException] = queue.Queue()
        self._held: memoryview | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        readers: dict[Path, SpanReader] = {}
        try:
            for path, offset, nbytes in self._ranges:
                buffer = self._free.get()
                if self._stopped.is_set():
                    return
                if path not in readers:
                    readers[path] = SpanReader(path, past_cache=True)
                self._ready.put((buffer, readers[path].span(offset, nbytes, buffer)))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by next()
            self._ready.put(exc)
        finally:
            for reader in readers.values():
                reader.close()

    def next(self) -> memoryview:
        """The next range's bytes, valid until the following call."""
        if self._held is not None:
            self._free.put(self._held)
        item = self._ready.get()
        if isinstance(item, BaseException):
            self._held = None
            raise item
        self._held, view = item
        return view

    def close(self) -> None:
        """Stop reading (an error ended the caller's loop, or it is done)."""
        self._stopped.set()
        self._free.put(_aligned(0))
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(fd: int, view: memoryview, position: int) -> int:
    """Fill `view` from `position`; fewer bytes only at the end of the file."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], position + done)
        if got == 0:
            break
        done += got
    return done


class ChunkWriter:
    """A new file written front to back: a large one past the page cache in aligned chunks by a thread
    of its own, so the caller makes the next bytes while the last are written."""

    def __init__(self, path: str | os.PathLike, expected_bytes: int) -> None:
        self.fd, self.direct = _open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, expected_bytes >= DIRECT_FROM_BYTES)
        self.size = 0
        if not self.direct:
            return
        self._free: queue.Queue[memoryview] = queue.Queue()
        for _ in range(2):
            self._free.put(_aligned(CHUNK_BYTES))
        self._full: queue.Queue[tuple[memoryview, int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._chunk, self._used = self._free.get(), 0
        self._thread = threading.Thread(target=self._drain, name="chunk-writer", daemon=True)
        self._thread.start()

    def write(self, data: memoryview) -> None:
        """Append `data` (copied before this returns)."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        if not self.direct:
            _write_all(self.fd, view)
            return
        while view:
            take = min(CHUNK_BYTES - self._used, len(view))
            self._chunk[self._used:self._used + take] = view[:take]
            self._used += take
            view = view[take:]
            if self._used == CHUNK_BYTES:
                self._hand_over(CHUNK_BYTES)

    def grew(self, nbytes: int) -> None:
        """The file grew by `nbytes` that the caller wrote to `fd` itself (a kernel copy, never with direct I/O)."""
        self.size += nbytes

    def _hand_over(self, nbytes: int) -> None:
        if self._error is not None:
            raise self._error
        self._full.put((self._chunk, nbytes))
        self._chunk, self._used = self._free.get(), 0

    def _drain(self) -> None:
        position = 0
        while (item := self._full.get()) is not None:
            chunk, nbytes = item
            try:
                if self._error is None:
                    self._write_direct(chunk[:nbytes], position)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                self._error = exc
            position += nbytes
            self._free.put(chunk)

    def _write_direct(self, view: memoryview, position: int) -> None:
        try:
            _pwrite_all(self.fd, view, position)
        except OSError as exc:
            if exc.errno not in _REFUSED:
                raise
            _undirect(self.fd)
            _pwrite_all(self.fd, view, position)

    def _stop(self) -> None:
        if self.direct and self._thread.is_alive():
            self._full.put(None)
            self._thread.join()

    def close(self) -> None:
        """Write what is left and close; the file is then exactly `size` bytes."""
        try:
            if self.direct:
                if self._used:
                    padded = -(-self._used // ALIGN) * ALIGN
                    self._chunk[self._used:padded] = bytes(padded - self._used)
                    self._hand_over(padded)
                self._stop()
                if self._error is not None:
                    raise self._error
                os.ftruncate(self.fd, self.size)
        finally:
            self._stop()
            os.close(self.fd)

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()
            os.close(self.fd)


def _write_all(fd: int, view: memoryview) -> None:
    """A write may take less than it is given (a pipe, a signal); write until all is out."""
    while view:
        view = view[os.write(fd, view):]


def _pwrite_all(fd: int, view: memoryview, position: int) -> None:
    while view:
        done = os.pwrite(fd, view, position)
        view, position = view[done:], position + done
