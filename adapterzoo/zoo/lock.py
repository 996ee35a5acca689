"""`lock`: a JSON list of every registry file that has a source, enough for `pull --lock` to rebuild it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from adapterzoo.formats.io.atomic import atomic_output, check_output
from adapterzoo.zoo.models import FileEntry, Source
from adapterzoo.zoo.refs import ref_of

LOCK_VERSION = 1


def lock_entries(engine: Engine) -> list[dict[str, Any]]:
    """One object per sourced file (by path), from its newest source: ref, file_name, kind, base, size, sha256."""
    with Session(engine) as session:
        rows = session.execute(select(FileEntry, Source).join(Source, Source.file_id == FileEntry.id)
                               .order_by(Source.created.desc(), Source.id.desc())).all()
    entries: dict[int, tuple[str, dict[str, Any]]] = {}
    for entry, source in rows:
        ref = ref_of(source)
        if entry.id in entries or not ref:
            continue
        name = os.path.basename(entry.path) if entry.path else source.file_name
        entries[entry.id] = (entry.path or "", {"ref": ref, "file_name": name, "kind": entry.kind,
                                                "base": entry.base, "size": entry.size, "sha256": entry.sha256})
    return [body for _, body in sorted(entries.values(), key=lambda pair: pair[0])]


def write_lock(engine: Engine, dest: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    """Write the lock file atomically (an existing one only with force, never the registry it reads); returns
    what was written."""
    registry = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    check_output(dest, [registry] if registry else [], force)
    body = {"version": LOCK_VERSION, "files": lock_entries(engine)}
    with atomic_output(Path(dest)) as tmp:
        tmp.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    return body
