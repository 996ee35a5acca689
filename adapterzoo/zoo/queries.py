"""Look things up in the registry: filtered listings for `list`, one entry by id/path/hash for `show`."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, Text, and_, case, exists, func, or_, select, tuple_, type_coerce, union_all
from sqlalchemy.orm import Session, aliased

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.hosts import SHARED_HOST, current_host
from adapterzoo.zoo.models import HASH_COLUMNS, FileEntry, Location, RootMount, Source, Verification
from adapterzoo.zoo.roots import load_places
from adapterzoo.zoo.stated import stated_detail

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
    (pass, fail) or `never`; `root` keeps files with a copy under that folder; `source` a provider, or
    `none`; `host` keeps files with a location that host reaches (present or not); `ids` keeps only those
    files (the web's has-update filter)."""

    kind: str | None = None
    base: str | None = None
    query: str | None = None
    verdict: str | None = None
    status: str | None = None
    source: str | None = None
    root: str | None = None
    host: str | None = None
    ids: frozenset[int] | None = None


def list_entries(
    engine: Engine, kind: str | None = None, base: str | None = None, query: str | None = None,
    verdict: str | None = None, host: str | None = None, family: str | None = None,
) -> list[FileEntry]:
    """Entries by path (as this host sees them); `query` matches a path, trigger words, or a source's
    model/version name or trained words, ignoring case; `verdict` is the latest verification's (pass, fail) or
    `never` for files never verified; `host`: only files with a location that host reaches (present or not);
    `family` keeps those of that family (SDXL's), as the file's own metadata names it, else its sources' labels
    (`zoo.stated`)."""
    statement = _filtered(select(FileEntry), FileFilter(kind, base, query, verdict, host=host))
    with Session(engine) as session:
        entries = sorted(session.scalars(statement), key=lambda e: (e.path is None, e.path or "", e.id))
    if family is None:
        return entries
    sources = sources_for(engine, [e.id for e in entries])
    return [e for e in entries if stated_detail(e.details or {}, [s.base_stated for s in sources[e.id]],
                                                "family") == family]


def page_entries(engine: Engine, chosen: FileFilter, sort: str = "name", page: int = 1,
                 per_page: int = 48) -> tuple[list[FileEntry], int]:
    """One page (1-based) of the entries `chosen` selects in `sort` order, and how many it selects in all."""
    if sort not in SORTS:
        raise AdapterzooError(f"sort is one of {', '.join(SORTS)}, not {sort!r}")
    skip = (max(page, 1) - 1) * per_page
    with Session(engine) as session:
        if sort == "name":
            ids = _by_name(session, chosen, skip, per_page)
        else:  # ids first (from the index alone), then only this page's rows
            order = {"size": (FileEntry.size.desc(), FileEntry.id),
                     "newest": (FileEntry.first_seen.desc(), FileEntry.id),
                     "verdict": (case(VERDICT_ORDER, value=_latest_verdict(), else_=len(VERDICT_ORDER)),
                                 FileEntry.id)}[sort]
            ids = list(session.scalars(_filtered(select(FileEntry.id), chosen).order_by(*order).limit(per_page)
                                       .offset(skip)))
        total = session.scalar(_filtered(select(func.count(FileEntry.id)), chosen)) or 0
        by_id = {e.id: e for e in session.scalars(select(FileEntry).where(FileEntry.id.in_(ids)))}
        return [by_id[i] for i in ids], total


def _by_name(session: Session, chosen: FileFilter, skip: int, per_page: int) -> list[int]:
    """One page of the ids `chosen` selects, by file name: the name_key of each file's first location here (this
    host's and shared ones, present before missing, then by stored path: FileEntry.path's), then by id; files no
    location here names come last, by id. The named ones come from ix_locations_host_name_key in its order, one
    range per host, merged, up to the page's end: no name past the page is read, nor sorted."""
    here = [current_host(), SHARED_HOST]
    shown, other = aliased(Location, name="shown"), aliased(Location, name="other")
    postgres = session.get_bind().dialect.name == "postgresql"

    def place(loc: Any) -> Any:  # its rank among a file's locations, paths compared as Python compares them
        return tuple_(loc.missing, loc.path.collate("C") if postgres else loc.path, loc.id)  # (SQLite: by itself)

    earlier = exists().where(other.file_id == shown.file_id, other.id != shown.id,  # (from the index: the row
                             other.host.in_(here), place(other) < place(shown))   # itself is not read again)
    located = select(shown.name_key, shown.file_id)
    if chosen != FileFilter():  # every filter reads files; without one, the join would only cost a seek per row
        located = _filtered(located.join(FileEntry, FileEntry.id == shown.file_id), chosen, located=True)
    arms = [located.where(shown.host == host, ~earlier) for host in here]
    parts = arms  # SQLite merges the arms of an ordered UNION ALL, each read in its index's order
    if postgres:  # PostgreSQL reads an arm in index order only when the arm itself is ordered and limited
        firsts = [arm.order_by(shown.name_key, shown.file_id).limit(skip + per_page).subquery() for arm in arms]
        parts = [select(first.c.name_key, first.c.file_id) for first in firsts]
    named = union_all(*parts)
    ids = [row.file_id for row in session.execute(named.order_by(*named.selected_columns).limit(per_page)
                                                  .offset(skip))]
    if len(ids) == per_page:
        return ids
    if ids or not skip:
        before = skip + len(ids)
    else:
        before = session.scalar(select(func.count()).select_from(union_all(*arms).subquery())) or 0
    nameless = _filtered(select(FileEntry.id), chosen).where(
        ~exists().where(Location.file_id == FileEntry.id, Location.host.in_(here)))
    return ids + list(session.scalars(nameless.order_by(FileEntry.id).limit(per_page - len(ids))
                                      .offset(max(skip - before, 0))))


def _columns(session: Session, statement: Select) -> tuple[list[Any], ...]:
    """The result's columns as plain lists, straight from the driver (no ORM rows: 20,000 of them cost more
    than the query)."""
    cursor = session.connection().execute(statement).cursor
    rows = cursor.fetchall() if cursor is not None else []
    return tuple(map(list, zip(*rows))) if rows else tuple([] for _ in statement.selected_columns)


def counts_by_kind_and_base(engine: Engine) -> tuple[dict[str, int], dict[str, int]]:
    """How many entries there are of each kind and of each base (one pass): what the filter menus offer."""
    kinds: dict[str, int] = {}
    bases: dict[str, int] = {}
    with Session(engine) as session:
        for kind, base, n in session.execute(select(FileEntry.kind, FileEntry.base, func.count(FileEntry.id))
                                             .group_by(FileEntry.kind, FileEntry.base)):
            kinds[kind] = kinds.get(kind, 0) + n
            bases[base] = bases.get(base, 0) + n
    return kinds, bases


def _latest_verdict() -> Any:
    """The verdict of the file's latest verification (NULL: never verified), one index seek per file."""
    return (select(Verification.verdict).where(Verification.file_id == FileEntry.id)
            .order_by(Verification.id.desc()).limit(1).scalar_subquery())


def _filtered(statement: Select, chosen: FileFilter, located: bool = False) -> Select:
    """The entries `chosen` selects among those with a location on some host (`located`: the statement joins
    each to a location already)."""
    if not located:  # an index seek per file that is read, not a list of every location's file built first
        statement = statement.where(exists().where(Location.file_id == FileEntry.id))
    if chosen.host:
        statement = statement.where(FileEntry.id.in_(select(Location.file_id).where(reached_by(chosen.host))))
    if chosen.ids is not None:
        statement = statement.where(FileEntry.id.in_(sorted(chosen.ids)))
    if chosen.verdict == "never":
        statement = statement.where(~exists().where(Verification.file_id == FileEntry.id))
    elif chosen.verdict:
        statement = statement.where(_latest_verdict() == chosen.verdict)
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
        statement = statement.where(FileEntry.id.in_(
            select(Location.file_id).where(Location.path.startswith(root + "/", autoescape=True))))
    if chosen.query:
        needle = chosen.query.lower()

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


def latest_ids(file_ids: list[int] | None = None) -> Select:
    """The id of each file's latest verification (of `file_ids` only, when given)."""
    statement = select(func.max(Verification.id))
    if file_ids is not None:
        statement = statement.where(Verification.file_id.in_(file_ids))
    return statement.group_by(Verification.file_id)


def latest_verifications(engine: Engine, file_id: int | None = None,
                         file_ids: list[int] | None = None) -> dict[int, Verification]:
    """file id -> its latest verification, for every verified file (or just `file_id`, or `file_ids`)."""
    if file_id is not None:
        file_ids = [file_id]
    with Session(engine) as session:
        if file_ids is None:
            return {v.file_id: v for v in session.scalars(select(Verification).where(Verification.id.in_(latest_ids())))}
        found: dict[int, Verification] = {}
        for start in range(0, len(file_ids), ID_BATCH):
            latest = latest_ids(file_ids[start:start + ID_BATCH])
            found.update((v.file_id, v) for v in session.scalars(select(Verification).where(Verification.id.in_(latest))))
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
