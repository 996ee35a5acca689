"""The file hashes Civitai answers by-hash lookups for, all from one read pass (FORMATS.md §6).

hashlib, blake3 and zlib release the GIL on large buffers, so the calling thread reads chunks
and one thread per digest hashes them: the digests run in parallel on all cores while each
byte is read from disk once. Files under 1 MiB are hashed in the calling thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import blake3

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.io.direct_io import SpanReader

CHUNK_BYTES = 8 << 20  # large enough that per-call and thread hand-off overheads vanish
QUEUE_CHUNKS = 2  # how far the reader may run ahead of the slowest digest (bounds memory)
THREADS_FROM_BYTES = 1 << 20  # below this, starting the threads costs more than they save
AUTOV1_START = 1 << 20  # A1111's legacy model hash: the 64 KiB at offset 1 MiB
AUTOV1_LENGTH = 64 << 10


@dataclass(frozen=True)
class FileHashes:
    """Lowercase hex digests; autov3 is None for files that are not safetensors."""

    sha256: str
    autov1: str
    autov2: str
    autov3: str | None
    blake3: str
    crc32: str

    def to_json(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


class _Crc32:
    """zlib.crc32 behind the update() interface the other digests share."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)


@dataclass
class _Span:
    """A digest of the file bytes in [start, end); end None means to the end of the file."""

    hasher: _Hasher
    start: int
    end: int | None = None

    def piece(self, chunk: bytes, position: int) -> memoryview | None:
        """The part of `chunk` (which starts at file offset `position`) inside this span."""
        lo = max(self.start - position, 0)
        hi = len(chunk) if self.end is None else min(self.end - position, len(chunk))
        return memoryview(chunk)[lo:hi] if lo < hi else None


class _Inline:
    """Hashes in the reading thread: for the tiny AutoV1 span and for small files."""

    def __init__(self, span: _Span) -> None:
        self.span = span

    def feed(self, chunk: bytes, position: int) -> None:
        piece = self.span.piece(chunk, position)
        if piece is not None:
            self.span.hasher.update(piece)

    def finish(self) -> BaseException | None:
        return None  # an error here was already raised by feed()


class _Worker:
    """A thread that feeds the pieces it is given to one digest, in order."""

    def __init__(self, span: _Span) -> None:
        self.span = span
        self._error: BaseException | None = None
        self._pieces: queue.Queue[memoryview | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._thread = threading.Thread(target=self._run, name="hash_file")
        self._thread.start()

    def _run(self) -> None:
        try:
            while (piece := self._pieces.get()) is not None:
                self.span.hasher.update(piece)
        except BaseException as exc:  # keep draining so the reader never blocks on a full queue
            self._error = exc
            while self._pieces.get() is not None:
                pass

    def feed(self, chunk: bytes, position: int) -> None:
        piece = self.span.piece(chunk, position)
        if piece is not None:
            self._pieces.put(piece)

    def finish(self) -> BaseException | None:
        """Wait for the digest to take in everything fed so far; return what went wrong, if anything."""
        self._pieces.put(None)
        self._thread.join()
        return self._error


class StreamHashes:
    """Every digest hash_file gives, fed the file's bytes in order as they arrive: a download hashes
    what it writes, so the file need not be read again afterwards.

    `data_offset` is where safetensors tensor data starts (AutoV3); `threaded` runs one thread per
    digest, worth it from about 1 MiB. Use it as a context manager so the threads always stop.
    """

    def __init__(self, data_offset: int | None = None, threaded: bool = True) -> None:
        if data_offset is not None and data_offset < 0:
            raise ValueError(f"data_offset must be >= 0, got {data_offset}")
        self.data_offset = data_offset
        self.size = 0
        self._sha256, self._data_sha256, self._autov1 = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
        self._blake, self._crc = blake3.blake3(), _Crc32()
        spans = [_Span(self._sha256, 0), _Span(self._blake, 0), _Span(self._crc, 0)]
        if data_offset is not None:
            spans.append(_Span(self._data_sha256, data_offset))
        hasher_for = _Worker if threaded else _Inline
        self._workers = [*(hasher_for(span) for span in spans),
                         _Inline(_Span(self._autov1, AUTOV1_START, AUTOV1_START + AUTOV1_LENGTH))]
        self._open = True

    def __enter__(self) -> StreamHashes:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def update(self, chunk: bytes) -> None:
        """Take the next bytes of the file; `chunk` must not change afterwards (threads read it later)."""
        for worker in self._workers:
            worker.feed(chunk, self.size)
        self.size += len(chunk)

    def close(self) -> None:
        """Wait for every digest to take in all it was fed; raise what went wrong in one of them."""
        _raise_first(self._stop())

    def discard(self) -> None:
        """Stop the threads and ignore their errors: what they were fed is being thrown away."""
        self._stop()

    def _stop(self) -> list[BaseException | None]:
        if not self._open:
            return []
        self._open = False
        return [worker.finish() for worker in self._workers]

    def result(self) -> FileHashes:
        """The digests of everything fed; AutoV3 None when tensor data would start past the end."""
        self.close()
        full = self._sha256.hexdigest()
        has_data = self.data_offset is not None and self.data_offset <= self.size
        return FileHashes(
            sha256=full,
            autov1=self._autov1.hexdigest()[:8],
            autov2=full[:10],
            autov3=self._data_sha256.hexdigest() if has_data else None,
            blake3=self._blake.hexdigest(),
            crc32=f"{self._crc.value:08x}",
        )


def _raise_first(errors: list[BaseException | None]) -> None:
    for error in errors:
        if error is not None:
            raise error


def hash_file(
    path: str | os.PathLike,
    data_offset: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> FileHashes:
    """SHA256, AutoV1/V2/V3, BLAKE3 and CRC32 of a file in one read pass.

    `data_offset` is where safetensors tensor data starts (8 + header length) and gives AutoV3;
    None gives autov3 None. `progress` is called with the size of each chunk just read.
    """
    try:
        with open(path, "rb", buffering=0) as fh:
            threaded = os.fstat(fh.fileno()).st_size >= THREADS_FROM_BYTES
            with StreamHashes(data_offset, threaded) as hashes:
                while chunk := fh.read(CHUNK_BYTES):
                    hashes.update(chunk)
                    if progress is not None:
                        progress(len(chunk))
    except OSError as exc:
        raise AdapterzooError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from None
    if data_offset is not None and data_offset > hashes.size:
        raise BadFileError(f"tensor data should start at byte {data_offset} but the file is {hashes.size} bytes")
    return hashes.result()


def sha256_of(path: Path, *, stop: threading.Event | None = None) -> str | dict[str, str]:
    """An input's SHA-256 for provenance metadata; a folder's per file, by relative path.

    Only SHA-256 is recorded, so only SHA-256 is computed: the other five digests would cost a merge
    about as much CPU as the merge itself. `stop`, once set, ends the hashing with an error.
    """
    path = Path(path)
    if path.is_dir():
        return {f.relative_to(path).as_posix(): _sha256(f, stop) for f in sorted(path.rglob("*")) if f.is_file()}
    return _sha256(path, stop)


def _sha256(path: Path, stop: threading.Event | None = None) -> str:
    """SHA-256 over aligned spans of the file, never copied into Python: a large file is read past the page
    cache (`direct_io`: 20 GB through the cache cost 25 s of CPU on the development VM, past it 1 s)."""
    digest = hashlib.sha256()
    try:
        with SpanReader(path, past_cache=True) as reader:
            size, offset = os.fstat(reader.fd).st_size, 0
            while offset < size:
                if stop is not None and stop.is_set():
                    raise AdapterzooError(f"hashing {path} was stopped")
                length = min(CHUNK_BYTES, size - offset)
                digest.update(reader.span(offset, length))
                offset += length
    except OSError as exc:
        raise AdapterzooError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()
