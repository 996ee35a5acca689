"""File rows are contents: find or make the row of a content by its SHA-256, and fold rows that turn out to
be one content into one, so its locations, sources, verifications and history stay together."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from adapterzoo.zoo.models import Event, FileEntry, Location, Source, Verification

FILES = FileEntry.__table__
CONTENT_COLUMNS = tuple(c.name for c in FILES.columns if c.name not in ("id", "first_seen", "last_seen"))
FILE_REFERENCES = (Location.__table__, Source.__table__, Verification.__table__, Event.__table__)


def content_values(values: dict[str, Any]) -> dict[str, Any]:
    """The files-table part of what scan.index_values found."""
    return {name: values[name] for name in CONTENT_COLUMNS}


def upsert_content(connection: Connection, values: dict[str, Any], now: datetime) -> int:
    """The id of the row for this content: a new row, or the one with the same SHA-256 brought up to date
    (probe results of this adapterzoo). A content with no SHA-256 (unreadable) always gets a row of its own."""
    row = {**content_values(values), "first_seen": now, "last_seen": now}
    if row["sha256"] is None:
        return connection.execute(insert(FILES).returning(FILES.c.id), row).scalar_one()
    return connection.execute(_content_upsert(connection.dialect.name), row).scalar_one()


@cache
def _content_upsert(dialect_name: str) -> Any:
    """INSERT ... ON CONFLICT (sha256) DO UPDATE, built once: its values come with each execute."""
    statement = (sqlite if dialect_name == "sqlite" else postgresql).insert(FILES)
    return statement.on_conflict_do_update(
        index_elements=[FILES.c.sha256],
        set_={name: statement.excluded[name] for name in (*CONTENT_COLUMNS, "last_seen") if name != "sha256"},
    ).returning(FILES.c.id)


def overwrite_content(connection: Connection, file_id: int, values: dict[str, Any], now: datetime) -> None:
    """Give an existing row (one that had no SHA-256 yet: unreadable, or a folder before folders had digests)
    what its content turned out to be, keeping its id."""
    connection.execute(update(FILES).where(FILES.c.id == file_id).values(**content_values(values), last_seen=now))


def content_id(connection: Connection, sha256: str) -> int | None:
    return connection.execute(select(FILES.c.id).where(FILES.c.sha256 == sha256)).scalar()


def merge_into(connection: Connection, keep: int, others: list[int]) -> None:
    """Fold the rows `others` into `keep`: their locations, sources, verifications and events now name `keep`,
    its trigger words gain theirs, its first and last seen span theirs; then the emptied rows go."""
    if not others:
        return
    ids = [keep, *others]
    rows = connection.execute(select(FILES.c.id, FILES.c.trigger_words, FILES.c.first_seen, FILES.c.last_seen)
                              .where(FILES.c.id.in_(ids))).all()
    by_id = {row.id: row for row in rows}
    words: list[str] = []
    for file_id in ids:
        words += [w for w in (by_id[file_id].trigger_words if file_id in by_id else []) if w not in words]
    for table in FILE_REFERENCES:
        connection.execute(update(table).where(table.c.file_id.in_(others)).values(file_id=keep))
    connection.execute(update(FILES).where(FILES.c.id == keep).values(
        trigger_words=words, first_seen=min(r.first_seen for r in rows), last_seen=max(r.last_seen for r in rows)))
    connection.execute(delete(FILES).where(FILES.c.id.in_(others)))


def duplicate_groups(connection: Connection) -> list[list[int]]:
    """Ids of rows sharing a SHA-256, oldest first, per SHA-256 held more than once (what an old registry,
    keyed by path, had for every copy of a file)."""
    repeated = select(FILES.c.sha256).where(FILES.c.sha256.is_not(None)).group_by(FILES.c.sha256) \
        .having(func.count() > 1)
    rows = connection.execute(select(FILES.c.sha256, FILES.c.id).where(FILES.c.sha256.in_(repeated))
                              .order_by(FILES.c.sha256, FILES.c.id)).all()
    groups: dict[str, list[int]] = {}
    for sha256, file_id in rows:
        groups.setdefault(sha256, []).append(file_id)
    return list(groups.values())
