"""The JSON shape of each thing adapterzoo shows, built in one place: the CLI's --json and the web API both
print what these functions return, so a script reads the same fields from either.

It reads the registry through zoo's query functions and holds no logic beyond choosing fields.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine

from adapterzoo.zoo.models import FileEntry, Verification
from adapterzoo.zoo.queries import entries_by_id, latest_verifications, sources_of, verifications_of
from adapterzoo.zoo.scan import ScanReport
from adapterzoo.zoo.stated import source_warnings
from adapterzoo.zoo.triggers import tag_counts

PROVENANCE_KEY = "adapterzoo.operation"  # the metadata entry ops/provenance.py writes into every output


def file_row(entry: FileEntry, latest: Verification | None) -> dict[str, Any]:
    """One entry as `list --json` prints it: the registry row and its latest verdict (null: never verified)."""
    return {**entry.to_json(), "verified": latest.verdict if latest else None}


def file_rows(engine: Engine, entries: list[FileEntry]) -> list[dict[str, Any]]:
    """`list --json` / `GET /api/files`: a row per entry, in the order given."""
    latest = latest_verifications(engine, file_ids=[e.id for e in entries])
    return [file_row(e, latest.get(e.id)) for e in entries]


def file_detail(engine: Engine, entry: FileEntry) -> dict[str, Any]:
    """`show --json` / `GET /api/files/{id}`: the row, its sources (and what they say that the tensors contradict),
    its latest and every verification, the training tags counted over the dataset folders, and how adapterzoo made
    the file (if it did)."""
    history = verifications_of(engine, entry.id)
    sources = sources_of(engine, entry.id)
    return {
        **entry.to_json(),
        "sources": [s.to_json() for s in sources],
        "source_warnings": source_warnings(entry.base, entry.details or {}, sources),
        "verification": history[0].to_json() if history else None,
        "verifications": [v.to_json() for v in history],
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


def scan_result(engine: Engine, report: ScanReport) -> dict[str, Any]:
    """`scan --json` and a finished scan job: the counts, each problem, every entry found."""
    files = file_rows(engine, entries_by_id(engine, report.ids))
    return {**report.counts(), "problems": report.problems, "files": files}
