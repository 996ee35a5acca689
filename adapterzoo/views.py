"""The JSON shape of each thing adapterzoo shows, built in one place: the CLI's --json and the web API both
print what these functions return, so a script reads the same fields from either.

It reads the registry through zoo's query functions and holds no logic beyond choosing fields.
"""

from __future__ import annotations

import json
import os
from typing import Any

from sqlalchemy import Engine

from adapterzoo.zoo.dupes import disk_use, find_dupes
from adapterzoo.zoo.events import history as events_of
from adapterzoo.zoo.models import FileEntry, Verification
from adapterzoo.zoo.queries import entries_by_id, latest_verifications, sources_of, verifications_of
from adapterzoo.zoo.scan import ScanReport
from adapterzoo.zoo.stated import source_warnings
from adapterzoo.zoo.triggers import tag_counts
from adapterzoo.zoo.updates import ModelUpdates

HISTORY_SHOWN = 20  # newest events `show` lists
PROVENANCE_KEY = "adapterzoo.operation"  # the metadata entry ops/provenance.py writes into every output


def file_row(entry: FileEntry, latest: Verification | None, host: str | None = None) -> dict[str, Any]:
    """One entry as `list --json` prints it: the registry row (paths as `host` sees them, default this host)
    and its latest verdict (null: never verified), and whether that run was `verify --quick`."""
    return {**entry.to_json(host), "verified": latest.verdict if latest else None,
            "verified_quick": latest.quick if latest else None}


def file_rows(engine: Engine, entries: list[FileEntry], host: str | None = None) -> list[dict[str, Any]]:
    """`list --json` / `GET /api/files`: a row per entry, in the order given."""
    latest = latest_verifications(engine, file_ids=[e.id for e in entries])
    return [file_row(e, latest.get(e.id), host) for e in entries]


def file_detail(engine: Engine, entry: FileEntry) -> dict[str, Any]:
    """`show --json` / `GET /api/files/{id}`: the row with every location, its sources (and what they say that the tensors contradict), its newest events (moves,
    trash, ...), its latest and every verification, the training tags counted over the dataset folders, and how
    adapterzoo made the file (if it did)."""
    verifications = verifications_of(engine, entry.id)
    sources = sources_of(engine, entry.id)
    return {
        **entry.to_json(),
        "sources": [s.to_json() for s in sources],
        "source_warnings": source_warnings(entry.base, entry.details or {}, sources),
        "history": [e.to_json() for e in events_of(engine, entry.id, limit=HISTORY_SHOWN)],
        "verification": verifications[0].to_json() if verifications else None,
        "verifications": [v.to_json() for v in verifications],
        "training_tags": [{"tag": tag, "count": n} for tag, n in tag_counts(entry.file_metadata.get(
            "ss_tag_frequency", ""))],
        "provenance": provenance(entry.file_metadata),
    }


def provenance(metadata: dict[str, str]) -> dict[str, Any] | None:
    """The operation, inputs and settings adapterzoo recorded in a file it wrote; None for any other file."""
    try:
        record = json.loads(metadata.get(PROVENANCE_KEY) or "null")
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def scan_result(engine: Engine, report: ScanReport | None, roots_not_found: list[str] = ()) -> dict[str, Any]:
    """`scan --json` and a finished scan job: the counts, each problem and move, the roots that were not
    there (unplugged: nothing under them was marked missing), every entry found at the path it was found at."""
    if report is None:
        return {"problems": [], "moves": [], "roots_not_found": list(roots_not_found), "files": []}
    rows = {row["id"]: row for row in file_rows(engine, entries_by_id(engine, report.ids))}
    files = [{**rows[file_id], "path": path, "name": os.path.basename(path)} for file_id, path in report.found]
    return {**report.counts(), "problems": report.problems, "moves": report.moves,
            "roots_not_found": list(roots_not_found), "files": files}



def dupe_groups(engine: Engine, by: str = "sha256") -> list[dict[str, Any]]:
    """`dupes --json` / `GET /api/dupes`: one object per group of this host's copies, largest saving first."""
    return [group.to_json() for group in find_dupes(engine, by)]


def disk_use_rows(engine: Engine, by: str = "kind") -> list[dict[str, Any]]:
    """`du --json` / `GET /api/du`: bytes on disk, files and copies per kind, base, root or source."""
    return disk_use(engine, by)


def update_rows(results: list[ModelUpdates]) -> list[dict[str, Any]]:
    """`updates --json` / `GET /api/updates`: one object per Civitai model the registry holds a file of."""
    return [result.to_json() for result in results]
