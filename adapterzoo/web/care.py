"""The library-care views in the web: the last `updates` check, kept in memory so the Updates page, the
library's "update available" badges and its has-update filter render without asking Civitai again.

A check asks Civitai once per 100 models (seconds at most); it runs when the Updates page or /api/updates is
opened with no check yet, or with ?check=1. Every other page reads the kept result and never waits on Civitai.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, select

from adapterzoo.views import update_rows
from adapterzoo.zoo.models import Source
from adapterzoo.zoo.updates import find_updates


@dataclass(frozen=True)
class UpdateCheck:
    """One check's rows (`updates --json`), when it ran, and the registry files of models with a newer version."""

    rows: list[dict[str, Any]]
    checked: datetime
    file_ids: frozenset[int]


@dataclass
class Updates:
    """The newest default check (same_base and early access off), shared by every request."""

    last: UpdateCheck | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, engine: Engine, same_base: bool = False, include_early_access: bool = False
              ) -> list[dict[str, Any]]:
        """Ask Civitai now (AdapterzooError when it cannot be reached); a default check is kept."""
        rows = update_rows(find_updates(engine, same_base, include_early_access))
        if not same_base and not include_early_access:
            with self.lock:
                self.last = UpdateCheck(rows, datetime.now(timezone.utc), _files_of(engine, rows))
        return rows

    def file_ids(self) -> frozenset[int] | None:
        """Files with an update available per the last check; None before any check."""
        last = self.last
        return None if last is None else last.file_ids


def _files_of(engine: Engine, rows: list[dict[str, Any]]) -> frozenset[int]:
    """Every registry file sourced from a Civitai model that has a newer version."""
    models = [r["model_id"] for r in rows if r["status"] == "update"]
    if not models:
        return frozenset()
    with engine.connect() as connection:
        return frozenset(connection.scalars(select(Source.file_id).where(
            Source.provider == "civitai", Source.civitai_model_id.in_(models))))
