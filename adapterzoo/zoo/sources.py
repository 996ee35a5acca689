"""Recording where a registry file came from (enrich now, pull later) and keeping its source's preview."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from adapterzoo.formats.io.atomic import atomic_output
from adapterzoo.zoo.civitai import CivitaiClient
from adapterzoo.zoo.db import home_folder
from adapterzoo.zoo.library import PREVIEW_SIDECAR
from adapterzoo.zoo.models import Source
from adapterzoo.zoo.remote import SourceRecord


def record_source(session: Session, file_id: int, record: SourceRecord, preview_path: str | None,
                  now: datetime) -> None:
    """Add `record` as the file's source, replacing what the same provider said before (in `session`)."""
    session.execute(delete(Source).where(Source.file_id == file_id, Source.provider == record.provider))
    session.add(Source(file_id=file_id, created=now, preview_path=preview_path, **record.columns()))


def save_preview(client: CivitaiClient, record: SourceRecord) -> str | None:
    """The source's first image, kept as <home>/previews/civitai-<version>.preview.png; never beside the
    user's files. None when the source has no image."""
    if not record.preview_url:
        return None
    folder = home_folder() / "previews"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.provider}-{record.civitai_version_id}{PREVIEW_SIDECAR}"
    if not path.exists():
        data = client.fetch_image(record.preview_url)
        with atomic_output(path) as tmp:
            tmp.write_bytes(data)
    return str(path)
