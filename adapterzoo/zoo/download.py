"""Download one file over HTTP the way model files need it: into `<name>.part`, resumed with Range
after a cut, hashed as the bytes arrive, checked against the source's size and SHA256, and only
then moved to its name; never over a different file already there.

The `.part` file is its own lock (flock): a second download of the same file waits for the first,
then finds the file done or resumes what the first left. Where the filesystem keeps extended
attributes, the server's validator (ETag or Last-Modified) is stored on the `.part`, so a resume in a
later run asks `If-Range` and restarts cleanly when the file changed on the server.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import requests
from tqdm import tqdm
from urllib3.exceptions import HTTPError as Urllib3Error

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.safetensors_header import MAX_HEADER_BYTES
from adapterzoo.zoo.file_moves import move_new
from adapterzoo.zoo.file_names import content_disposition_name, safe_file_name, url_name
from adapterzoo.zoo.hashing import FileHashes, StreamHashes, hash_file, sha256_of
from adapterzoo.zoo.http_get import Host, Retry, get_file, shown_url, token_sent, wait_or_raise

CHUNK_BYTES = 1 << 20
PART_SUFFIX = ".part"
VALIDATOR_ATTR = "user.adapterzoo.validator"
THREADS_FROM_BYTES = 1 << 20  # hash in threads from here; below it the thread start-up costs more
FALLBACK_NAME = "download"
Progress = Callable[[int, "int | None"], None]  # (bytes so far, total bytes or None)
CUT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, Urllib3Error)


class WrongFile(AdapterzooError):
    """The bytes are not the file the source or the lock file names (size or SHA-256); nothing was kept."""


@dataclass(frozen=True)
class Downloaded:
    """Where the file is and what it is. `reused`: an identical file was already there and is kept
    (nothing new written). `beside`: a different file holds the name the server gave; ours is
    `path`, that name with our AutoV2 before the extension."""

    path: Path
    hashes: FileHashes
    size: int
    reused: bool = False
    beside: Path | None = None
    resumed_from: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, "reused": self.reused,
                "beside": None if self.beside is None else str(self.beside),
                "resumed_from": self.resumed_from, "hashes": self.hashes.to_json()}


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    headers: Mapping[str, str] | None = None,
    size: int | None = None,
    sha256: str | None = None,
    name: str | None = None,
    host: Host = Host(),
    retry: Retry = Retry(),
    progress_bar: bool = False,
    session: requests.Session | None = None,
    progress: Progress | None = None,
) -> Downloaded:
    """Fetch `url` into folder `dest` (created if missing) and return where it landed.

    `headers` (e.g. the Civitai token) go to the first host only. `size` and `sha256` are the
    source's claims, checked before the file gets its name; either may be None. `name` is the name
    the source gives, used when the server sends no Content-Disposition and to find a `.part` to
    resume before asking; the server's name wins. `host` names the provider in errors. A file with
    `sha256` already in place (or beside it) is reused without a request. `progress(bytes, total)` is called
    as bytes arrive (total None while unknown); it may raise to stop, leaving the .part to resume.
    """
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    job = _Job(session or requests.Session(), url, headers, host, retry, size, sha256.lower() if sha256 else None,
               progress)
    known = safe_file_name(name) if name else None
    response = None
    try:
        if known is None:
            response = job.get(0, None)
            known = _served_name(response, url)
        if job.sha256 and (found := identical_in_place(folder / known, job.size, job.sha256)):
            return found
        with _locked_part(folder / f"{known}{PART_SUFFIX}", job.notice if progress_bar else None) as part:
            if part.waited:  # the other download may have finished: look again before taking any bytes
                if response is not None:
                    response.close()
                    response = None
                if job.sha256 and (found := identical_in_place(folder / known, job.size, job.sha256)):
                    return found
            return job.transfer(part, response, folder, known, progress_bar)
    finally:
        if response is not None:
            response.close()


@dataclass
class _Part:
    path: Path
    fh: BinaryIO
    waited: bool


@dataclass
class _Job:
    session: requests.Session
    url: str
    headers: Mapping[str, str] | None
    host: Host
    retry: Retry
    size: int | None
    sha256: str | None
    progress: Progress | None = None
    hasher: StreamHashes | None = field(default=None, init=False)

    def get(self, start: int, validator: str | None) -> requests.Response:
        return get_file(self.session, self.url, headers=self.headers, host=self.host, retry=self.retry,
                        start=start, if_range=validator)

    def notice(self, message: str) -> None:
        tqdm.write(message, file=sys.stderr)

    def transfer(
        self, part: _Part, response: requests.Response | None, folder: Path, name: str, progress_bar: bool
    ) -> Downloaded:
        """Stream the rest of the file into the locked .part, across cuts, then check and place it."""
        fh = part.fh
        offset = os.fstat(fh.fileno()).st_size
        if response is not None and offset:
            response.close()  # we asked before we knew of this .part: ask again for the rest only
            response = None
        resumed_from, validator, failures = offset, _stored_validator(fh), 0
        final_name = name
        with tqdm(total=self.size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=name[-40:], disable=None if progress_bar else True) as bar:
            try:
                while True:
                    if response is None:
                        response = self.get(offset, validator)
                    final_name = _served_name(response, self.url, name)
                    if response.status_code == 416 and _holds_all(response, offset):
                        break  # the .part already is the whole file
                    if offset and not self._continues(response, offset, validator):
                        fh.truncate(0)  # the server ignored Range, or the file changed or shrank: start over
                        self._drop_hasher()
                        resumed_from = offset = 0
                        bar.reset(total=self.size)
                        if response.status_code != 200:
                            response.close()
                            response, validator = None, None
                            continue
                    if offset == 0:
                        validator = _validator(response)
                        _store_validator(fh, validator)
                    bar.total = self.size or _total_size(response) or bar.total
                    before = offset
                    try:
                        offset = self._stream(response, fh, offset, bar)
                        break
                    except CUT as exc:
                        response.close()
                        response = None
                        offset = os.fstat(fh.fileno()).st_size
                        failures = 0 if offset > before else failures
                        failures = wait_or_raise(self.retry, failures, None,
                                                 f"the download from {self.host.name} was cut ({_short(exc)})")
            except BaseException:
                self._drop_hasher()
                raise
            finally:
                if response is not None:
                    response.close()
        return self._finish(part, folder, final_name, offset, resumed_from)

    @staticmethod
    def _continues(response: requests.Response, offset: int, validator: str | None) -> bool:
        """Whether the answer carries the bytes right after our .part, of the same file."""
        if response.status_code != 206:
            return False
        first = _content_range(response.headers.get("Content-Range", ""))[0]
        changed = validator is not None and _validator(response) not in (None, validator)
        return first == offset and not changed

    def _stream(self, response: requests.Response, fh: BinaryIO, offset: int, bar: tqdm) -> int:
        """Append the answer's bytes to the .part and the hashes; return the new length."""
        chunks = response.iter_content(CHUNK_BYTES)
        for chunk in chunks:
            if self.hasher is None:
                self._start_hasher(fh, offset, chunk)
            _write_all(fh, chunk)
            self.hasher.update(chunk)
            offset += len(chunk)
            bar.update(len(chunk))
            if self.progress is not None:
                self.progress(offset, bar.total)
        if self.hasher is None:
            self._start_hasher(fh, offset, b"")
        return offset

    def _start_hasher(self, fh: BinaryIO, offset: int, first: bytes) -> None:
        """Hash what the .part already holds, then what arrives; a fresh file's first bytes must be a file."""
        head = os.pread(fh.fileno(), 64, 0) if offset else b""
        if not offset and (what := _page_kind(first)):
            raise self.host.not_a_file(what, token_sent(self.headers))
        threaded = (self.size or offset + len(first)) >= THREADS_FROM_BYTES or len(first) == CHUNK_BYTES
        self.hasher = StreamHashes(safetensors_data_offset(head + first), threaded=threaded)
        position = 0
        while position < offset:
            piece = os.pread(fh.fileno(), min(CHUNK_BYTES, offset - position), position)
            if not piece:
                break
            self.hasher.update(piece)
            position += len(piece)

    def _drop_hasher(self) -> None:
        if self.hasher is not None:
            self.hasher.discard()
            self.hasher = None

    def _finish(self, part: _Part, folder: Path, name: str, size: int, resumed_from: int) -> Downloaded:
        """Check the claims, then give the .part its name; a file that fails a check is removed."""
        if self.hasher is None:  # the .part was already complete: nothing streamed through us
            self._start_hasher(part.fh, size, b"")
        hashes = self.hasher.result()
        problem = None
        if self.size is not None and size != self.size:
            problem = f"{size} bytes arrived but {self.host.name} says the file is {self.size}"
        elif self.sha256 and hashes.sha256 != self.sha256:
            problem = f"its SHA256 is {hashes.sha256} but {self.host.name} says {self.sha256}"
        if problem:
            part.path.unlink(missing_ok=True)
            raise WrongFile(f"{name} from {shown_url(self.url)} is not the file expected: {problem}; "
                            f"nothing was saved")
        _clear_validator(part.fh)
        path, reused, beside = place_file(part.path, folder / name, hashes.sha256)
        return Downloaded(path=path, hashes=hashes, size=size, reused=reused, beside=beside,
                          resumed_from=resumed_from)


def place_file(src: Path, final: Path, sha256: str) -> tuple[Path, bool, Path | None]:
    """Move `src` to `final`, never over another file: an identical one there is kept (and `src`
    removed); a different one stays and `src` goes beside it as `stem.<autov2>.ext`.
    Returns (where the file is, whether an existing one was reused, the different file it avoided)."""
    beside_path = beside_name(final, sha256)
    for target in (final, beside_path):
        avoided = final if target != final else None
        if move_new(src, target):
            return target, False, avoided
        if target.is_file() and sha256_of(target) == sha256:
            src.unlink()
            return target, True, avoided
    raise AdapterzooError(f"{final.name} and {beside_path.name} already exist in {final.parent} and differ from "
                          f"the new file; nothing was replaced, it stays at {src}")


def beside_name(final: Path, sha256: str) -> Path:
    """`name.safetensors` -> `name.<autov2>.safetensors`: where a file goes when its name is taken."""
    return final.with_name(f"{final.stem}.{sha256[:10]}{final.suffix}")


def identical_in_place(final: Path, size: int | None, sha256: str) -> Downloaded | None:
    """The file we would download, if it already sits at its name or beside it."""
    for target in (final, beside_name(final, sha256)):
        if target.is_file() and (size is None or target.stat().st_size == size):
            hashes = local_hashes(target)
            if hashes.sha256 == sha256:
                return Downloaded(path=target, hashes=hashes, size=target.stat().st_size, reused=True,
                                  beside=final if target != final else None)
    return None


def bring_in(src: Path, folder: Path, name: str, sha256: str | None, claimant: str) -> Downloaded:
    """Put a local file (another copy in the registry, the Hub's cache, a mirror folder) into `folder` under
    `name`: hard-linked where the filesystem allows (no second copy of gigabytes), else copied. The bytes that
    landed are hashed and refused (WrongFile) unless their SHA-256 is `sha256`, as `claimant` states; never
    placed over a different file (see place_file)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name_of_tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=PART_SUFFIX)
    os.close(fd)
    tmp = Path(name_of_tmp)
    tmp.unlink()
    try:
        try:
            os.link(src.resolve(), tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        hashes, size = local_hashes(tmp), tmp.stat().st_size
        if sha256 and hashes.sha256 != sha256:
            raise WrongFile(f"{src.name} is not the file expected: its SHA256 is {hashes.sha256} but {claimant} "
                            f"says {sha256}; nothing was saved")
        final = folder / (safe_file_name(name) or src.name)
        try:
            path, reused, beside = place_file(tmp, final, hashes.sha256)
        except AdapterzooError:
            raise AdapterzooError(f"{final.name} and its AutoV2 name already hold different files in {folder}; "
                                  f"nothing was replaced") from None
    finally:
        tmp.unlink(missing_ok=True)
    return Downloaded(path=path, hashes=hashes, size=size, reused=reused, beside=beside)


def local_hashes(path: Path) -> FileHashes:
    """Every hash of a file on disk in one pass (AutoV3 too when it is a safetensors file)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    return hash_file(path, safetensors_data_offset(head))


@contextmanager
def _locked_part(path: Path, notice: Callable[[str], None] | None) -> Iterator[_Part]:
    """Open and exclusively lock the .part, waiting for another download holding it. A lock taken on
    a .part that was renamed or removed meanwhile is worthless, so the open is retried until the
    locked file is the one at the path. An empty .part is removed on the way out."""
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)  # writes always go to the end
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if notice is not None:
                    notice(f"{path.name[:-len(PART_SUFFIX)]} is already being downloaded; waiting for it")
                fcntl.flock(fd, fcntl.LOCK_EX)
                waited = True
            if _is_at(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    fh = os.fdopen(fd, "r+b", buffering=0)
    try:
        yield _Part(path, fh, waited)
    finally:
        if _is_at(fd, path) and os.fstat(fd).st_size == 0:
            path.unlink()
        fh.close()


def _write_all(fh: BinaryIO, data: bytes) -> None:
    """An unbuffered write may take only part of the bytes; loop until all are in the file."""
    view = memoryview(data)
    while view:
        view = view[fh.write(view):]


def _is_at(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _served_name(response: requests.Response, url: str, fallback: str | None = None) -> str:
    """The server's name for the file (Content-Disposition), else `fallback`, else the URL's last part."""
    for candidate in (content_disposition_name(response.headers.get("Content-Disposition")), fallback,
                      url_name(response.url or url)):
        if candidate and (safe := safe_file_name(candidate)):
            return safe
    return FALLBACK_NAME


def _page_kind(first: bytes) -> str | None:
    """'a web page' or 'JSON' when the first bytes are text of that kind (servers mislabel them);
    a model file (safetensors' length prefix, a pickle, a zip) always has binary bytes up front."""
    text = first[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text or b"\x00" in text[:64]:
        return None
    if text[:1] == b"<":
        return "a web page"
    if text[:1] in (b"{", b"["):
        try:
            json.loads(first.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "JSON" if all(32 <= b < 127 or b in b"\t\r\n" for b in text[:64]) else None
        return "JSON"
    return None


def safetensors_data_offset(head: bytes) -> int | None:
    """Where tensor data starts if these first bytes are a safetensors header's (gives AutoV3)."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (length,) = struct.unpack("<Q", head[:8])
    return 8 + length if length <= MAX_HEADER_BYTES else None


def _content_range(value: str) -> tuple[int | None, int | None, int | None]:
    """`bytes FIRST-LAST/TOTAL` (or `bytes */TOTAL`) as numbers; None for what is missing."""
    match = re.fullmatch(r"\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*", value)
    if not match:
        return None, None, None
    first, last, total = match.groups()
    return (None if first is None else int(first), None if last is None else int(last),
            None if total in (None, "*") else int(total))


def _holds_all(response: requests.Response, offset: int) -> bool:
    """Whether a 416 to `Range: bytes=offset-` says the file is exactly `offset` bytes long."""
    return _content_range(response.headers.get("Content-Range", ""))[2] == offset


def _total_size(response: requests.Response) -> int | None:
    if response.status_code == 206:
        return _content_range(response.headers.get("Content-Range", ""))[2]
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _validator(response: requests.Response) -> str | None:
    """What If-Range may carry: a strong ETag, else Last-Modified (weak ETags are not allowed there)."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _stored_validator(fh: BinaryIO) -> str | None:
    try:
        return os.getxattr(fh.fileno(), VALIDATOR_ATTR).decode()
    except (AttributeError, OSError, UnicodeDecodeError):  # no xattrs on this OS or filesystem, or none stored
        return None


def _store_validator(fh: BinaryIO, value: str | None) -> None:
    if value is None:
        _clear_validator(fh)
        return
    try:
        os.setxattr(fh.fileno(), VALIDATOR_ATTR, value.encode())
    except (AttributeError, OSError):
        pass  # a later run then resumes without If-Range; the size and SHA256 checks still hold


def _clear_validator(fh: BinaryIO) -> None:
    try:
        os.removexattr(fh.fileno(), VALIDATOR_ATTR)
    except (AttributeError, OSError):
        pass


def _short(exc: BaseException) -> str:
    text = str(exc)
    return (text.splitlines()[0][:120] if text else exc.__class__.__name__)
