"""Look things up in the registry: filtered listings for `list`, one entry by id/path/hash for `show`."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, Text, and_, func, or_, select, type_coerce
from sqlalchemy.orm import Session

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.hosts import SHARED_HOST, current_host
from adapterzoo.zoo.models import HASH_COLUMNS, FileEntry, Location, RootMount, Source, Verification
from adapterzoo.zoo.roots import load_places

HEX = re.compile(r"[0-9a-f]+")
MIN_SHA256_PREFIX = 8
ID_BATCH = 500  # ids per IN (...): databases cap the number of bound parameters


VERDICTS = ("pass", "fail", "never")


def list_entries(
    engine: Engine, kind: str | None = None, base: str | None = None, query: str | None = None,
    verdict: str | None = None, host: str | None = None,
) -> list[FileEntry]:
    """Entries by path (as this host sees them); `query` matches a path, trigger words, or a source's
    model/version name or trained words, ignoring case; `verdict` is the latest verification's (pass, fail) or
    `never` for files never verified; `host`: only files with a location that host reaches (present or not)."""
    statement = select(FileEntry).where(FileEntry.id.in_(select(Location.file_id)))
    if verdict == "never":
        statement = statement.where(FileEntry.id.not_in(select(Verification.file_id)))
    elif verdict:
        verified = select(Verification.file_id).where(Verification.id.in_(latest_ids()),
                                                      Verification.verdict == verdict)
        statement = statement.where(FileEntry.id.in_(verified))
    if kind:
        statement = statement.where(FileEntry.kind == kind)
    if base:
        statement = statement.where(FileEntry.base == base)
    if host:
        statement = statement.where(FileEntry.id.in_(select(Location.file_id).where(reached_by(host))))
    if query:
        needle = query.lower()

        def has(column: Any) -> Any:
            text = type_coerce(column, Text)  # JSON lists are searched as their stored text
            return func.lower(text).contains(needle, autoescape=True)

        named = select(Source.file_id).where(
            or_(has(Source.model_name), has(Source.version_name), has(Source.trained_words))
        )
        placed = select(Location.file_id).where(has(Location.path))
        statement = statement.where(
            or_(FileEntry.id.in_(placed), has(FileEntry.trigger_words), FileEntry.id.in_(named))
        )
    with Session(engine) as session:
        entries = list(session.scalars(statement))
    return sorted(entries, key=lambda e: (e.path is None, e.path or "", e.id))


def reached_by(host: str) -> Any:
    """SQL condition on locations: on `host`, or on a shared root `host` mounts."""
    mounted = select(RootMount.root_id).where(RootMount.host == host)
    return or_(Location.host == host, (Location.host == SHARED_HOST) & Location.root_id.in_(mounted))


def find_entry(engine: Engine, ref: str) -> FileEntry:
    """The one entry whose id, path (on this host), any hash, or sha256 prefix (>= 8 hex) is `ref`; failing
    those, whose file name is `ref` on any host.

    Raises AdapterzooError when nothing matches or when `ref` fits more than one entry.
    """
    ref = ref.strip()
    places = load_places(engine, current_host())
    paths = {places.stored(p)[:2] for p in {os.path.abspath(ref), str(Path(ref).resolve())}}
    conditions = [FileEntry.id.in_(select(Location.file_id).where(
        or_(*(and_(Location.host == host, Location.path == path) for host, path in paths))))]
    if ref.isdigit():
        conditions.append(FileEntry.id == int(ref))
    digest = ref.lower().removeprefix("0x")
    if HEX.fullmatch(digest):
        conditions.extend(getattr(FileEntry, name) == digest for name in HASH_COLUMNS)
        if len(digest) >= MIN_SHA256_PREFIX:
            conditions.append(FileEntry.sha256.startswith(digest, autoescape=True))
    matches = _entries_where(engine, or_(*conditions))
    if not matches and ref and not set(ref) & set("/\\"):
        named = select(Location.file_id).where(or_(Location.path.endswith("/" + ref, autoescape=True),
                                                   Location.path.endswith("\\" + ref, autoescape=True)))
        matches = _entries_where(engine, FileEntry.id.in_(named))
    if not matches:
        raise AdapterzooError(f"nothing in the registry matches {ref!r} (an id, a path, a file name, or a hash)")
    if len(matches) > 1:
        ids = ", ".join(str(m.id) for m in matches[:10])
        raise AdapterzooError(f"{ref!r} matches {len(matches)} entries (ids {ids}): give a longer hash or the path")
    return matches[0]


def _entries_where(engine: Engine, condition: Any) -> list[FileEntry]:
    with Session(engine) as session:
        return list(session.scalars(select(FileEntry).where(condition).order_by(FileEntry.id)))


def entry_by_sha256(engine: Engine, sha256: str) -> FileEntry | None:
    """The file with this content, if the registry knows it."""
    with Session(engine) as session:
        return session.scalars(select(FileEntry).where(FileEntry.sha256 == sha256)).first()


def file_on_disk(engine: Engine, sha256: str) -> FileEntry | None:
    """The registry file with this SHA-256 if its copy here (its `path`) is on disk, unchanged (size, mtime)
    since it was hashed."""
    entry = entry_by_sha256(engine, sha256)
    for location, local in entry.reachable()[:1] if entry is not None else []:
        try:
            stat = os.stat(local)
        except OSError:
            return None
        if not location.missing and (stat.st_size, stat.st_mtime_ns) == (location.size, location.mtime_ns):
            return entry
    return None


def entries_by_id(engine: Engine, ids: list[int]) -> list[FileEntry]:
    """Entries in the order of `ids` (what a scan found), for its --json output."""
    by_id: dict[int, FileEntry] = {}
    with Session(engine) as session:
        for start in range(0, len(ids), ID_BATCH):
            chunk = ids[start:start + ID_BATCH]
            by_id.update((e.id, e) for e in session.scalars(select(FileEntry).where(FileEntry.id.in_(chunk))))
    return [by_id[i] for i in ids if i in by_id]


def sources_of(engine: Engine, file_id: int) -> list[Source]:
    """Where the entry came from, newest first (pull and enrich record these)."""
    with Session(engine) as session:
        statement = select(Source).where(Source.file_id == file_id).order_by(Source.created.desc(), Source.id.desc())
        return list(session.scalars(statement))


def latest_ids() -> Select:
    """The id of each file's latest verification."""
    return select(func.max(Verification.id)).group_by(Verification.file_id)


def latest_verifications(engine: Engine, file_id: int | None = None) -> dict[int, Verification]:
    """file id -> its latest verification, for every verified file (or just `file_id`)."""
    statement = select(Verification).where(Verification.id.in_(latest_ids()))
    if file_id is not None:
        statement = statement.where(Verification.file_id == file_id)
    with Session(engine) as session:
        return {v.file_id: v for v in session.scalars(statement)}


def paths_by_sha256(engine: Engine, digests: Iterable[str]) -> dict[str, list[str]]:
    """SHA-256 -> the paths the registry holds those bytes at, on any host (as this host reaches them, else as
    stored), for each of `digests` the registry knows."""
    digests = sorted(set(digests))
    host = current_host()
    found: dict[str, list[str]] = {}
    with Session(engine) as session:
        for start in range(0, len(digests), ID_BATCH):
            for entry in session.scalars(select(FileEntry).where(FileEntry.sha256.in_(digests[start:start + ID_BATCH]))):
                paths = sorted(loc.local_path(host) or loc.path for loc in entry.locations)
                found[entry.sha256] = paths  # type: ignore[index]
    return found
