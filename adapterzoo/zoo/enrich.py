"""`enrich`: ask Civitai which model version each registry file is (by SHA-256) and record the answer.

Everything is fetched first and written after, so a network failure leaves the registry as it was
(nothing is marked unknown because the network was down). A file Civitai does not know is
remembered in unknown_files and not asked about again unless retry_missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from adapterzoo.zoo.civitai import CivitaiClient, file_sha256, source_record
from adapterzoo.zoo.library import write_sidecars
from adapterzoo.zoo.models import FileEntry, Location, Source, UnknownFile
from adapterzoo.zoo.queries import find_entry
from adapterzoo.zoo.remote import SourceRecord
from adapterzoo.zoo.sources import record_source, save_preview
from adapterzoo.zoo.stated import disagreements

PROVIDER = "civitai"


@dataclass
class Outcome:
    """What enrich did for one entry: found (with what), unknown, or skipped and why."""

    id: int
    path: str | None
    sha256: str | None
    status: str  # found | unknown | skipped
    reason: str | None = None
    source: dict[str, Any] | None = None
    sidecars: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what the source says that the file's tensors contradict

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "name": Path(self.path).name if self.path else None, "sha256": self.sha256,
                "status": self.status, "reason": self.reason, "source": self.source, "sidecars": self.sidecars,
                "warnings": self.warnings}


def enrich(engine: Engine, refs: list[str], every: bool = False, retry_missing: bool = False,
           write_sidecars: bool = False, token: str | None = None) -> list[Outcome]:
    """Look up the entries named by `refs` (or, with `every`, all without a Civitai source) on Civitai."""
    entries = [find_entry(engine, ref) for ref in refs] if refs else _unsourced(engine) if every else []
    entries = list({e.id: e for e in entries}.values())
    asked_before = _unknown(engine)
    outcomes: dict[int, Outcome] = {}
    todo: list[FileEntry] = []
    for entry in entries:
        if entry.is_folder or not entry.sha256:
            outcomes[entry.id] = Outcome(entry.id, entry.path, None, "skipped", "no SHA-256 (a folder or unreadable)")
        elif entry.sha256 in asked_before and not retry_missing:
            when = asked_before[entry.sha256].isoformat(timespec="seconds")
            outcomes[entry.id] = Outcome(entry.id, entry.path, entry.sha256, "skipped",
                                         f"Civitai did not know it on {when} (--retry-missing asks again)")
        else:
            todo.append(entry)

    client = CivitaiClient(token=token)
    versions = client.versions_by_sha256(sorted({e.sha256 for e in todo})) if todo else []  # type: ignore[misc]
    found = _by_sha256(versions)
    previews = {vid: save_preview(client, record) for vid, (_, _, record) in _unique_versions(found).items()}

    now = datetime.now(timezone.utc).replace(tzinfo=None)
    with Session(engine) as session, session.begin():
        for entry in todo:
            match = found.get(entry.sha256)  # type: ignore[arg-type]
            if match is None:
                _mark_unknown(session, entry.sha256, now)  # type: ignore[arg-type]
                outcomes[entry.id] = Outcome(entry.id, entry.path, entry.sha256, "unknown", "Civitai does not know it")
                continue
            version, _, record = match
            session.execute(delete(UnknownFile).where(UnknownFile.provider == PROVIDER,
                                                      UnknownFile.sha256 == entry.sha256))
            preview = previews.get(version["id"])
            record_source(session, entry.id, record, preview, now)
            outcome = Outcome(entry.id, entry.path, entry.sha256, "found",
                              source={**record.columns(), "preview_path": preview},
                              warnings=disagreements(record.base, record.base_stated, entry.base, entry.details or {}))
            if write_sidecars and not entry.is_folder and not entry.missing:
                outcome.sidecars = _write_sidecars(Path(entry.path), version, preview)
            outcomes[entry.id] = outcome
    return [outcomes[e.id] for e in entries]


def _unsourced(engine: Engine) -> list[FileEntry]:
    """Every hashed file present somewhere (any host) with no Civitai source yet, by path."""
    sourced = select(Source.file_id).where(Source.provider == PROVIDER)
    present = select(Location.file_id).where(Location.missing.is_(False))
    with Session(engine) as session:
        entries = list(session.scalars(select(FileEntry).where(
            FileEntry.sha256.is_not(None), FileEntry.is_folder.is_(False), FileEntry.id.in_(present),
            FileEntry.id.not_in(sourced))))
    return sorted(entries, key=lambda e: e.path or "")


def _unknown(engine: Engine) -> dict[str, datetime]:
    with Session(engine) as session:
        rows = session.execute(select(UnknownFile.sha256, UnknownFile.asked).where(UnknownFile.provider == PROVIDER))
        return {sha256: asked for sha256, asked in rows}


def _mark_unknown(session: Session, sha256: str, now: datetime) -> None:
    row = session.scalar(select(UnknownFile).where(UnknownFile.provider == PROVIDER, UnknownFile.sha256 == sha256))
    if row is None:
        session.add(UnknownFile(provider=PROVIDER, sha256=sha256, asked=now))
    else:
        row.asked = now


def _by_sha256(versions: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any], SourceRecord]]:
    """SHA-256 -> (version, file, record) for every file of every version answered; the first version wins
    where one file appears in several (Civitai has such duplicates)."""
    found: dict[str, tuple[dict[str, Any], dict[str, Any], SourceRecord]] = {}
    for version in versions:
        for file in version.get("files") or []:
            digest = file_sha256(file)
            if digest and digest not in found:
                found[digest] = (version, file, source_record(version, file))
    return found


def _unique_versions(found: dict[str, tuple[dict[str, Any], dict[str, Any], SourceRecord]]) -> dict[int, Any]:
    return {match[0]["id"]: match for match in found.values()}


def _write_sidecars(path: Path, version: dict[str, Any], preview: str | None) -> list[str]:
    """`<name>.civitai.info` and `<name>.preview.png` beside the file, as A1111's Civitai extensions write them.
    An existing sidecar is the user's: it is kept, not replaced."""
    return [str(p) for p in write_sidecars(path, version, Path(preview).read_bytes() if preview else None)]
