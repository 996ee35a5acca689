"""The registry's history of what happened to files on disk (the events table)."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Engine, insert, select
from sqlalchemy.orm import Session

from adapterzoo.zoo.models import Event

EVENTS = Event.__table__
ADD_EVENT = insert(EVENTS).returning(EVENTS.c.id)  # its values come with each execute: compiled once


def utcnow() -> datetime:
    """Timestamps in the registry are naive UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def record_event(connection: Connection, host: str, action: str, file_id: int | None, path: str | None = None,
                 new_path: str | None = None, detail: dict[str, Any] | None = None, state: str = "done") -> int:
    """Add one event in the caller's transaction; returns its id."""
    row = {"created": utcnow(), "host": host, "action": action, "state": state, "file_id": file_id, "path": path,
           "new_path": new_path, "detail": detail or {}}
    return connection.execute(ADD_EVENT, row).scalar_one()


def move_action(old: str, new: str) -> str:
    """'rename' when a file kept its folder, else 'move'."""
    return "rename" if os.path.dirname(old) == os.path.dirname(new) else "move"


def history(engine: Engine, file_id: int | None = None, limit: int | None = None) -> list[Event]:
    """Events, newest first (of one file, if given)."""
    statement = select(Event).order_by(Event.id.desc())
    if file_id is not None:
        statement = statement.where(Event.file_id == file_id)
    if limit is not None:
        statement = statement.limit(limit)
    with Session(engine) as session:
        return list(session.scalars(statement))
