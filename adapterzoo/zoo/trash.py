"""Send a registry file to the platform's trash (never unlink), with its sidecars, and remember that it did.

The entry stays in the registry flagged missing, so its hashes, sources and verifications are kept; a line
per removal goes to <home>/trash.jsonl (what, when, from where). The library-care work's `rm` will take this
over with its own record in the registry.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, update

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.db import home_folder
from adapterzoo.zoo.models import FileEntry
from adapterzoo.zoo.triggers import PREVIEW_SUFFIXES, SIDECAR_SUFFIXES, sidecar_stem


def to_trash(engine: Engine, entry: FileEntry) -> dict[str, Any]:
    """Move the entry's file (or folder) and the sidecars beside it to the trash; returns what moved."""
    from send2trash import send2trash
    from send2trash.exceptions import TrashPermissionError

    path = Path(entry.path)
    if not path.exists():
        raise AdapterzooError(f"{path} is not there any more: nothing to move to the trash")
    stem = sidecar_stem(path, entry.is_folder)
    beside = [stem.with_name(stem.name + suffix) for suffix in (*SIDECAR_SUFFIXES, *PREVIEW_SUFFIXES)]
    moved = []
    for item in [path, *(p for p in beside if p.is_file())]:
        try:
            send2trash(str(item))
        except (OSError, TrashPermissionError) as exc:
            raise AdapterzooError(f"could not move {item} to the trash: {exc}") from None
        moved.append(str(item))
    with engine.begin() as connection:
        connection.execute(update(FileEntry).where(FileEntry.id == entry.id).values(missing=True))
    record = {"id": entry.id, "sha256": entry.sha256, "trashed": moved,
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(home_folder() / "trash.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    return record
