"""`pull`: fetch what REFs name (Civitai, the Hub, plain URLs) into a folder or an A1111/ComfyUI library,
check the bytes against the source's claims, and register the file with its source.

A file whose SHA-256 the registry already holds on disk is not fetched again; a file a lock file lists
that is already in place is not even looked up, and with a team mirror (zoo/mirror.py) one the mirror holds
is taken from there without asking its source. Each REF succeeds or fails on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.zoo import hub
from adapterzoo.zoo.civitai import CivitaiClient
from adapterzoo.zoo.download import (
    Downloaded,
    Progress,
    WrongFile,
    bring_in,
    download,
    identical_in_place,
)
from adapterzoo.zoo.file_names import safe_file_name
from adapterzoo.zoo.http_get import Host
from adapterzoo.zoo.library import choose_kind, library_folder, settle, write_sidecars
from adapterzoo.zoo.lock import LOCK_VERSION
from adapterzoo.zoo.mirror import Mirror
from adapterzoo.zoo.queries import file_on_disk
from adapterzoo.zoo.refs import locked_remote, resolve_ref
from adapterzoo.zoo.remote import RemoteFile
from adapterzoo.zoo.scan import Probed, index_file, probe_entry
from adapterzoo.zoo.sources import record_source, save_preview
from adapterzoo.zoo.stated import disagreements

CIVITAI = Host("Civitai", "CIVITAI_API_TOKEN")


@dataclass(frozen=True)
class Target:
    """Where pulled files go: one folder, or a library whose layout gives each kind its folder."""

    dest: Path = Path(".")
    library: Path | None = None
    layout: str = "a1111"

    def folder(self, kind: str | None) -> Path:
        if self.library is None:
            return self.dest
        return library_folder(self.library, kind or "unknown", self.layout)

    def wants_copy_of(self, path: str | Path) -> bool:
        """Whether a file already on disk at `path` should still be brought here: a library must hold its files,
        a plain folder need not duplicate one the registry knows elsewhere."""
        return self.library is not None and not Path(path).resolve().is_relative_to(self.library.resolve())


@dataclass
class Pulled:
    """What happened to one REF: pulled, already have, or failed (with the one-line reason)."""

    ref: str
    status: str
    path: str | None = None
    id: int | None = None
    source_ref: str | None = None  # the REF pinned to the version or commit that was fetched
    kind: str | None = None
    base: str | None = None
    size: int | None = None
    sha256: str | None = None
    autov2: str | None = None
    unsafe: bool = False
    resumed_from: int = 0
    notes: list[str] = field(default_factory=list)
    sidecars: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pull(engine: Engine, refs: list[str], target: Target, token: str | None = None, lock_file: str | None = None,
         progress_bar: bool = False, mirror: Mirror | None = None,
         progress: Progress | None = None) -> list[Pulled]:
    """Pull every entry of `lock_file` (if given), then every REF; one outcome each, in that order. Lock entries
    come from `mirror` first when it holds them. `progress(bytes, total)` follows each download (see
    `download`); what it raises stops the pull."""
    puller = _Puller(engine, target, CivitaiClient(token=token), progress_bar, mirror, progress)
    wanted: list[tuple[str, dict[str, Any] | None]] = [(e["ref"], e) for e in read_lock(lock_file)] if lock_file else []
    wanted += [(ref, None) for ref in refs]
    outcomes = []
    for ref, expected in wanted:
        try:
            outcomes.append(puller.pull(ref, expected))
        except AdapterzooError as exc:
            outcomes.append(Pulled(ref, "failed", error=str(exc)))
        except OSError as exc:  # the folder cannot be made or written: this REF fails, the others may not
            outcomes.append(Pulled(ref, "failed", error=f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")))
    return outcomes


def read_lock(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a lock file `adapterzoo lock` wrote, each with ref, file_name, kind, size and sha256."""
    body = read_json_object(Path(path))
    files = body.get("files")
    keys = {"ref", "file_name", "kind", "size", "sha256"}
    if body.get("version") != LOCK_VERSION or not isinstance(files, list) or not all(
            isinstance(f, dict) and keys <= f.keys() for f in files):
        raise AdapterzooError(f"{path} is not an adapterzoo lock file (version {LOCK_VERSION}, files with "
                              f"{', '.join(sorted(keys))})")
    return files


@dataclass
class _Puller:
    engine: Engine
    target: Target
    civitai: CivitaiClient
    progress_bar: bool
    mirror: Mirror | None = None
    progress: Progress | None = None

    def pull(self, ref: str, expected: dict[str, Any] | None) -> Pulled:
        if expected is not None and (there := self._in_place(expected)) is not None:
            return Pulled(ref, "already have", path=str(there.path), sha256=there.hashes.sha256,
                          autov2=there.hashes.autov2, size=there.size, kind=expected["kind"],
                          notes=["already in place; its SHA256 checked"])
        if expected is None or self.mirror is None or file_on_disk(self.engine, expected["sha256"]) is not None:
            return self._from_source(ref, expected, [])
        pinned = locked_remote(expected)
        try:
            got = self.mirror.fetch(expected["sha256"], expected["size"], expected["file_name"],
                                    self.target.folder(expected["kind"]), self.progress_bar, self.civitai.session)
        except AdapterzooError as exc:  # not there, or other bytes under its name: the lock's source is next
            missed = f"not from the mirror: {exc}"
        else:
            return self._register(ref, pinned, got, [f"from the mirror {self.mirror.shown}"])
        try:
            return self._from_source(ref, expected, [missed])
        except AdapterzooError as exc:
            raise AdapterzooError(f"{exc} ({missed})") from None

    def _from_source(self, ref: str, expected: dict[str, Any] | None, notes: list[str]) -> Pulled:
        """Resolve `ref` at its source (Civitai, the Hub, a URL) and take the file from the registry's copy or
        from there."""
        remote = resolve_ref(ref, token=self.civitai.token)
        sha256, size = remote.sha256, remote.size
        if expected is not None:
            if sha256 and sha256 != expected["sha256"]:
                raise AdapterzooError(f"{remote.ref} now offers a different file (SHA256 {sha256}) than the lock "
                                      f"file names ({expected['sha256']}); nothing was downloaded")
            sha256, size = expected["sha256"], expected["size"]
        known = file_on_disk(self.engine, sha256) if sha256 else None
        if known is not None and not self.target.wants_copy_of(known.path):
            notes = [*notes, "in the registry already; nothing was downloaded"]
            self._record(known.id, remote, notes)  # the registry learns where the file can be had again
            return Pulled(ref, "already have", path=known.path, id=known.id, source_ref=remote.ref, kind=known.kind,
                          base=known.base, size=known.size, sha256=known.sha256, autov2=known.autov2, notes=notes)
        folder = self.target.folder(expected["kind"] if expected else remote.source.kind)
        if known is not None:  # on disk elsewhere: the library gets it from there, not from the network
            got = bring_in(Path(known.path), folder, os.path.basename(known.path), sha256, "the registry's copy")
            notes = [*notes, f"copied from {known.path}, not downloaded"]
        elif remote.source.provider == "hf":
            got = self._from_hub(remote, folder, sha256)
        else:
            got = self._download(remote, folder, size, sha256)
        return self._register(ref, remote, got, notes)

    def _in_place(self, expected: dict[str, Any]) -> Downloaded | None:
        name = safe_file_name(expected["file_name"])
        folder = self.target.folder(expected["kind"])
        return identical_in_place(folder / name, expected["size"], expected["sha256"]) if name else None

    def _download(self, remote: RemoteFile, folder: Path, size: int | None, sha256: str | None) -> Downloaded:
        civitai = remote.source.provider == "civitai"
        token = self.civitai.token if civitai else None
        return download(remote.download_url, folder, headers={"Authorization": f"Bearer {token}"} if token else None,
                        size=size, sha256=sha256, name=remote.file_name,
                        host=CIVITAI if civitai else Host(urlsplit(remote.download_url).netloc or "the server"),
                        progress_bar=self.progress_bar, session=self.civitai.session, progress=self.progress)

    def _from_hub(self, remote: RemoteFile, folder: Path, sha256: str | None) -> Downloaded:
        """Through huggingface_hub's cache, then the SHA-256 it does not check, then into the folder."""
        cached = hub.fetch(remote.source, self.progress_bar)
        if self.progress is not None:  # huggingface_hub streams on its own: its end is what we can tell
            self.progress(cached.stat().st_size, cached.stat().st_size)
        try:
            return bring_in(cached, folder, remote.file_name or cached.name, sha256,
                            "the Hub" if sha256 == remote.sha256 else "the lock file")
        except WrongFile:
            hub.drop_cached(cached)
            raise

    def _register(self, ref: str, remote: RemoteFile, got: Downloaded, notes: list[str]) -> Pulled:
        probed = probe_entry(got.path)
        path, beside, reused = got.path, got.beside, got.reused
        if self.target.library is not None:
            placed = settle(got.path, self.target.library, self.target.layout, remote.source.kind, probed.result,
                            got.hashes.sha256)
            path, beside, reused = placed.path, placed.beside or beside, reused or placed.reused
        notes += _disagreements(remote, probed)
        if beside is not None:
            notes.append(f"{beside.name} is a different file: this one is {path.name}")
        if probed.error:
            notes.append(f"{'unsafe' if probed.unsafe else 'broken'}: {probed.error}")
        file_id = index_file(path, self.engine, probed, got.hashes)
        preview = self._record(file_id, remote, notes)
        sidecars = []
        if self.target.library is not None:
            image = Path(preview).read_bytes() if preview else None
            sidecars = [str(p) for p in write_sidecars(path, remote.info, image)]
        result = probed.result
        return Pulled(ref, "already have" if reused else "pulled", path=str(path), id=file_id,
                      source_ref=remote.ref,
                      kind=result.kind if result else remote.source.kind, base=result.base if result else None,
                      size=got.size, sha256=got.hashes.sha256, autov2=got.hashes.autov2, unsafe=probed.unsafe,
                      resumed_from=got.resumed_from, notes=notes, sidecars=sidecars)

    def _record(self, file_id: int, remote: RemoteFile, notes: list[str]) -> str | None:
        """Record `remote`'s source for the registry entry; returns where its preview was kept."""
        preview = self._preview(remote, notes)
        with Session(self.engine) as session, session.begin():
            record_source(session, file_id, remote.source, preview, datetime.now(timezone.utc).replace(tzinfo=None))
        return preview

    def _preview(self, remote: RemoteFile, notes: list[str]) -> str | None:
        """The source's preview, kept in the adapterzoo home; a preview that fails is a note, not a failure."""
        if remote.source.provider != "civitai":
            return None
        try:
            return save_preview(self.civitai, remote.source)
        except AdapterzooError as exc:
            notes.append(f"no preview: {exc}")
            return None


def _disagreements(remote: RemoteFile, probed: Probed) -> list[str]:
    """Where the source's kind, base or what its label says beyond the base (an SDXL family, an SD3.5 size) is not
    what the file turned out to be."""
    if probed.result is None:
        return []
    stated = remote.source
    notes = [note] if (note := choose_kind(stated.kind, probed.result)[1]) else []
    return notes + disagreements(stated.base, stated.base_stated, probed.result.base, probed.result.details)
