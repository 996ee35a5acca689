"""`rm`: a registry file's copies on this host, and their sidecars, go to the platform's trash (send2trash:
the desktop's Trash or Recycle Bin, where they can be restored), never unlinked. The registry forgets those
locations and records each in its history."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.events import record_event
from adapterzoo.zoo.hosts import current_host
from adapterzoo.zoo.models import FileEntry, Location
from adapterzoo.zoo.queries import find_entry
from adapterzoo.zoo.roots import load_places
from adapterzoo.zoo.sidecars import sidecar_files


@dataclass
class Trashed:
    """One copy sent to the trash (or not, and why)."""

    id: int
    path: str
    status: str  # trashed | failed
    sidecars: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def copies_to_trash(engine: Engine, refs: list[str]) -> list[tuple[FileEntry, Location, str]]:
    """(file, location, path here) for each REF: a path is that copy; an id, name or hash is every copy of the
    file on this host. All are found before anything is touched: one bad REF and nothing moves."""
    host = current_host()
    places = load_places(engine, host)
    chosen: dict[int, tuple[FileEntry, Location, str]] = {}
    for ref in refs:
        entry = find_entry(engine, ref)
        present = [(loc, local) for loc, local in entry.reachable(host) if not loc.missing]
        if os.path.exists(ref):
            stored = {places.stored(p)[:2] for p in (os.path.abspath(ref), str(Path(ref).resolve()))}
            present = [(loc, local) for loc, local in present if (loc.host, loc.path) in stored]
        if not present:
            raise AdapterzooError(f"{ref!r}: no copy of it on {host} to move to the trash")
        chosen.update((loc.id, (entry, loc, local)) for loc, local in present)
    return list(chosen.values())


def trash(engine: Engine, refs: list[str]) -> list[Trashed]:
    """Send each REF's copies and their sidecars to the trash; the registry follows what really went."""
    from send2trash import send2trash
    from send2trash.exceptions import TrashPermissionError

    host = current_host()
    outcomes = []
    for entry, location, local in copies_to_trash(engine, refs):
        path = Path(local)
        sidecars = sidecar_files(path, entry.is_folder)
        try:
            send2trash(path)
        except (OSError, TrashPermissionError) as exc:
            outcomes.append(Trashed(entry.id, local, "failed", error=f"{exc.__class__.__name__}: {exc}"))
            continue
        went, kept = [], []
        for sidecar in sidecars:
            try:
                send2trash(sidecar)
                went.append(str(sidecar))
            except (OSError, TrashPermissionError):
                kept.append(str(sidecar))
        with engine.begin() as connection:
            connection.execute(delete(Location.__table__).where(Location.__table__.c.id == location.id))
            record_event(connection, host, "trash", entry.id, location.path, None,
                         {"sidecars": went, "sidecars_kept": kept, "size": location.size})
        outcomes.append(Trashed(entry.id, local, "trashed", went,
                                f"could not trash {', '.join(kept)}" if kept else None))
    return outcomes
