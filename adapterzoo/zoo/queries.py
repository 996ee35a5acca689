"""Look things up in the registry: filtered listings for `list`, one entry by id/path/hash for `show`."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, Text, func, or_, select, type_coerce
from sqlalchemy.orm import Session

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.models import HASH_COLUMNS, FileEntry, Source, Verification

HEX = re.compile(r"[0-9a-f]+")
MIN_SHA256_PREFIX = 8
ID_BATCH = 500  # ids per IN (...): databases cap the number of bound parameters


VERDICTS = ("pass", "fail", "never")


def list_entries(
    engine: Engine, kind: str | None = None, base: str | None = None, query: str | None = None,
    verdict: str | None = None,
) -> list[FileEntry]:
    """Entries by path; `query` matches path, trigger words, or a source's model/version name or trained
    words, ignoring case; `verdict` is the latest verification's (pass, fail) or `never` for files never
    verified."""
    statement = select(FileEntry).order_by(FileEntry.path)
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
    if query:
        needle = query.lower()

        def has(column: Any) -> Any:
            text = type_coerce(column, Text)  # JSON lists are searched as their stored text
            return func.lower(text).contains(needle, autoescape=True)

        named = select(Source.file_id).where(
            or_(has(Source.model_name), has(Source.version_name), has(Source.trained_words))
        )
        statement = statement.where(
            or_(has(FileEntry.path), has(FileEntry.trigger_words), FileEntry.id.in_(named))
        )
    with Session(engine) as session:
        return list(session.scalars(statement))


def find_entry(engine: Engine, ref: str) -> FileEntry:
    """The one entry whose id, path, any hash, or sha256 prefix (>= 8 hex) is `ref`.

    Raises AdapterzooError when nothing matches or when `ref` fits more than one entry.
    """
    ref = ref.strip()
    paths = {os.path.abspath(ref), str(Path(ref).resolve())}
    conditions = [FileEntry.path.in_(paths)]
    if ref.isdigit():
        conditions.append(FileEntry.id == int(ref))
    digest = ref.lower().removeprefix("0x")
    if HEX.fullmatch(digest):
        conditions.extend(getattr(FileEntry, name) == digest for name in HASH_COLUMNS)
        if len(digest) >= MIN_SHA256_PREFIX:
            conditions.append(FileEntry.sha256.startswith(digest, autoescape=True))
    with Session(engine) as session:
        matches = list(session.scalars(select(FileEntry).where(or_(*conditions)).order_by(FileEntry.id)))
    if not matches:
        raise AdapterzooError(f"nothing in the registry matches {ref!r} (an id, a path, or a hash)")
    if len(matches) > 1:
        ids = ", ".join(str(m.id) for m in matches[:10])
        raise AdapterzooError(f"{ref!r} matches {len(matches)} entries (ids {ids}): give a longer hash or the path")
    return matches[0]


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
    """SHA-256 -> the registry paths holding those bytes, for each of `digests` the registry knows."""
    digests = sorted(set(digests))
    found: dict[str, list[str]] = {}
    with Session(engine) as session:
        for start in range(0, len(digests), ID_BATCH):
            chunk = digests[start:start + ID_BATCH]
            for sha256, path in session.execute(select(FileEntry.sha256, FileEntry.path)
                                                .where(FileEntry.sha256.in_(chunk)).order_by(FileEntry.path)):
                found.setdefault(sha256, []).append(path)
    return found


def file_on_disk(engine: Engine, sha256: str) -> FileEntry | None:
    """A registry file with this SHA-256 that is still on disk, unchanged (size, mtime) since it was hashed."""
    with Session(engine) as session:
        rows = session.scalars(select(FileEntry).where(FileEntry.sha256 == sha256, FileEntry.missing.is_(False))
                               .order_by(FileEntry.id)).all()
    for row in rows:
        try:
            stat = os.stat(row.path)
        except OSError:
            continue
        if (stat.st_size, stat.st_mtime_ns) == (row.size, row.mtime_ns):
            return row
    return None
