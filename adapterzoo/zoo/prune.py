"""`prune`: forget what has been gone a while. A location missing for more than N days is dropped; a file
left with no location anywhere, unseen for N days, is forgotten with its sources and verifications. Only
this host's locations (and shared ones it mounts) are judged: another host speaks for its own disks. Each
forgotten thing is written to the history first, with what the registry knew of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from adapterzoo.zoo.events import record_event, utcnow
from adapterzoo.zoo.hosts import current_host
from adapterzoo.zoo.models import FileEntry, Location, Source, Verification
from adapterzoo.zoo.queries import reached_by


@dataclass
class Prunable:
    """What a prune forgets: locations (each with its file's id and name) and files."""

    locations: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"locations": self.locations, "files": self.files}


def prunable(engine: Engine, days: float) -> Prunable:
    """Locations this host reaches missing for more than `days`, and the files that leaves with no location
    that no host has seen for `days` (files already without any location included)."""
    cutoff = utcnow() - timedelta(days=days)
    host = current_host()
    found = Prunable()
    with Session(engine) as session:
        gone = session.scalars(select(Location).where(
            Location.missing.is_(True), Location.missing_since < cutoff, reached_by(host))
            .order_by(Location.path)).all()
        gone_ids = {loc.id for loc in gone}
        files = {f.id: f for f in session.scalars(select(FileEntry).where(
            FileEntry.id.in_({loc.file_id for loc in gone}) | FileEntry.id.not_in(select(Location.file_id))))}
        for loc in gone:
            found.locations.append({"location_id": loc.id, "id": loc.file_id, "host": loc.host,
                                    "path": loc.local_path(host) or loc.path,
                                    "missing_since": loc.missing_since.isoformat()})
        for entry in sorted(files.values(), key=lambda f: f.id):
            left = [loc for loc in entry.locations if loc.id not in gone_ids]
            if not left and entry.last_seen < cutoff:
                found.files.append({"id": entry.id, "sha256": entry.sha256, "kind": entry.kind, "base": entry.base,
                                    "size": entry.size, "last_seen": entry.last_seen.isoformat(),
                                    "paths": sorted({loc.path for loc in entry.locations})})
    return found


def prune(engine: Engine, found: Prunable) -> Prunable:
    """Forget what `prunable` listed, in one transaction, each location and file written as an event first.
    What a scan found again meanwhile stays. Returns what was forgotten."""
    host = current_host()
    locations, files = Location.__table__, FileEntry.__table__
    done = Prunable()
    with engine.begin() as connection:
        still = set(connection.execute(select(locations.c.id).where(
            locations.c.id.in_([loc["location_id"] for loc in found.locations]), locations.c.missing.is_(True)))
            .scalars())
        done.locations = [loc for loc in found.locations if loc["location_id"] in still]
        for loc in done.locations:
            record_event(connection, host, "forget", loc["id"], loc["path"], None,
                         {"host": loc["host"], "missing_since": loc["missing_since"]})
        connection.execute(delete(locations).where(locations.c.id.in_(still), locations.c.missing.is_(True)))
        empty = set(connection.execute(select(files.c.id).where(
            files.c.id.in_([f["id"] for f in found.files]), files.c.id.not_in(select(locations.c.file_id))))
            .scalars())
        done.files = [entry for entry in found.files if entry["id"] in empty]
        for entry in done.files:
            record_event(connection, host, "forget", entry["id"], None, None, entry)
        for table in (Source.__table__, Verification.__table__):
            connection.execute(delete(table).where(table.c.file_id.in_(empty)))
        connection.execute(delete(files).where(files.c.id.in_(empty), files.c.id.not_in(select(locations.c.file_id))))
    return done
