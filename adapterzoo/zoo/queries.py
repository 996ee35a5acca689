"""Look things up in the registry: filtered listings for `list`, one entry by id/path/hash for `show`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, Text, and_, case, func, or_, select, type_coerce
from sqlalchemy.orm import Session

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.models import HASH_COLUMNS, FileEntry, Source, Verification

HEX = re.compile(r"[0-9a-f]+")
MIN_SHA256_PREFIX = 8
ID_BATCH = 500  # ids per IN (...): databases cap the number of bound parameters


VERDICTS = ("pass", "fail", "never")
STATUSES = ("ok", "missing", "unsafe", "broken")
PROVIDERS = ("civitai", "hf", "url", "none")  # none: no source recorded
SORTS = ("name", "size", "newest", "verdict")
VERDICT_ORDER = {"fail": 0, "pass": 1}  # sort by verdict: failures first, then passes, then never verified


@dataclass(frozen=True)
class FileFilter:
    """What `list` and the web page's filters select; None means any. `query` matches path, trigger words,
    or a source's model/version name or trained words, ignoring case; `verdict` is the latest verification's
    (pass, fail) or `never`; `root` keeps files under that folder; `source` a provider, or `none`."""

    kind: str | None = None
    base: str | None = None
    query: str | None = None
    verdict: str | None = None
    status: str | None = None
    source: str | None = None
    root: str | None = None


def list_entries(
    engine: Engine, kind: str | None = None, base: str | None = None, query: str | None = None,
    verdict: str | None = None,
) -> list[FileEntry]:
    """Every entry the filter selects, by path."""
    statement = _filtered(select(FileEntry), FileFilter(kind, base, query, verdict)).order_by(FileEntry.path)
    with Session(engine) as session:
        return list(session.scalars(statement))


def page_entries(engine: Engine, chosen: FileFilter, sort: str = "name", page: int = 1,
                 per_page: int = 48) -> tuple[list[FileEntry], int]:
    """One page (1-based) of the entries `chosen` selects in `sort` order, and how many it selects in all."""
    if sort not in SORTS:
        raise AdapterzooError(f"sort is one of {', '.join(SORTS)}, not {sort!r}")
    statement = _filtered(select(FileEntry), chosen)
    counted = _filtered(select(func.count(FileEntry.id)), chosen)
    if sort == "verdict":
        latest = select(Verification.file_id, Verification.verdict).where(Verification.id.in_(latest_ids())).subquery()
        rank = case(VERDICT_ORDER, value=latest.c.verdict, else_=len(VERDICT_ORDER))
        statement = statement.outerjoin(latest, latest.c.file_id == FileEntry.id).order_by(rank, _name(), FileEntry.id)
    else:
        order = {"name": (_name(), FileEntry.id), "size": (FileEntry.size.desc(), FileEntry.id),
                 "newest": (FileEntry.first_seen.desc(), FileEntry.id.desc())}[sort]
        statement = statement.order_by(*order)
    statement = statement.limit(per_page).offset((max(page, 1) - 1) * per_page)
    with Session(engine) as session:
        return list(session.scalars(statement)), session.scalar(counted) or 0


def counts_by(engine: Engine, column: str) -> dict[str, int]:
    """How many entries have each value of `column` (kind or base): what a filter menu offers."""
    field_ = getattr(FileEntry, column)
    with Session(engine) as session:
        rows = session.execute(select(field_, func.count(FileEntry.id)).group_by(field_).order_by(field_))
        return {value: n for value, n in rows}


def _name() -> Any:
    """The file name (what follows the last '/'), lower case: what `sort name` orders by."""
    folder = func.rtrim(FileEntry.path, func.replace(FileEntry.path, "/", ""))
    return func.lower(func.substr(FileEntry.path, func.length(folder) + 1))


def _filtered(statement: Select, chosen: FileFilter) -> Select:
    if chosen.verdict == "never":
        statement = statement.where(FileEntry.id.not_in(select(Verification.file_id)))
    elif chosen.verdict:
        verified = select(Verification.file_id).where(Verification.id.in_(latest_ids()),
                                                      Verification.verdict == chosen.verdict)
        statement = statement.where(FileEntry.id.in_(verified))
    if chosen.kind:
        statement = statement.where(FileEntry.kind == chosen.kind)
    if chosen.base:
        statement = statement.where(FileEntry.base == chosen.base)
    if chosen.status:
        statement = statement.where(_status(chosen.status))
    if chosen.source == "none":
        statement = statement.where(FileEntry.id.not_in(select(Source.file_id)))
    elif chosen.source:
        statement = statement.where(FileEntry.id.in_(select(Source.file_id).where(Source.provider == chosen.source)))
    if chosen.root:
        root = chosen.root.rstrip("/")
        statement = statement.where(FileEntry.path.startswith(root + "/", autoescape=True))
    if chosen.query:
        needle = chosen.query.lower()

        def has(column: Any) -> Any:
            text = type_coerce(column, Text)  # JSON lists are searched as their stored text
            return func.lower(text).contains(needle, autoescape=True)

        named = select(Source.file_id).where(
            or_(has(Source.model_name), has(Source.version_name), has(Source.trained_words))
        )
        statement = statement.where(
            or_(has(FileEntry.path), has(FileEntry.trigger_words), FileEntry.id.in_(named))
        )
    return statement


def _status(status: str) -> Any:
    """FileEntry.status as SQL: missing wins over unsafe, unsafe over broken."""
    present = FileEntry.missing.is_(False)
    if status == "missing":
        return FileEntry.missing.is_(True)
    if status == "unsafe":
        return and_(present, FileEntry.unsafe.is_(True))
    healthy = and_(present, FileEntry.unsafe.is_(False))
    if status == "broken":
        return and_(healthy, FileEntry.error.is_not(None))
    if status == "ok":
        return and_(healthy, FileEntry.error.is_(None))
    raise AdapterzooError(f"status is one of {', '.join(STATUSES)}, not {status!r}")


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


def latest_verifications(engine: Engine, file_id: int | None = None,
                         file_ids: list[int] | None = None) -> dict[int, Verification]:
    """file id -> its latest verification, for every verified file (or just `file_id`, or `file_ids`)."""
    statement = select(Verification).where(Verification.id.in_(latest_ids()))
    if file_id is not None:
        statement = statement.where(Verification.file_id == file_id)
    found: dict[int, Verification] = {}
    with Session(engine) as session:
        if file_ids is None:
            return {v.file_id: v for v in session.scalars(statement)}
        for start in range(0, len(file_ids), ID_BATCH):
            chunk = file_ids[start:start + ID_BATCH]
            found.update((v.file_id, v) for v in session.scalars(statement.where(Verification.file_id.in_(chunk))))
    return found


def verifications_of(engine: Engine, file_id: int) -> list[Verification]:
    """Every verification of the entry, newest first."""
    with Session(engine) as session:
        return list(session.scalars(select(Verification).where(Verification.file_id == file_id)
                                    .order_by(Verification.id.desc())))


def verification_by_id(engine: Engine, verification_id: int) -> Verification | None:
    with Session(engine) as session:
        return session.get(Verification, verification_id)


def sources_for(engine: Engine, file_ids: list[int]) -> dict[int, list[Source]]:
    """file id -> its sources, newest first, for a page of entries."""
    found: dict[int, list[Source]] = {i: [] for i in file_ids}
    with Session(engine) as session:
        for start in range(0, len(file_ids), ID_BATCH):
            chunk = file_ids[start:start + ID_BATCH]
            rows = session.scalars(select(Source).where(Source.file_id.in_(chunk))
                                   .order_by(Source.created.desc(), Source.id.desc()))
            for source in rows:
                found[source.file_id].append(source)
    return found


def entry_by_id(engine: Engine, file_id: int) -> FileEntry | None:
    with Session(engine) as session:
        return session.get(FileEntry, file_id)
