"""Store what `verify` found, per file (`queries.latest_verifications` reads it back)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from adapterzoo.zoo.models import Verification


def _largest_effect(effects: list[dict[str, Any]]) -> float | None:
    """The pixel change at the largest |multiplier| rendered: multiplier 1 with the default 0, 0.5, 1."""
    if not effects:
        return None
    return max(effects, key=lambda e: abs(e["multiplier"]))["mean_abs_pixel_change"]


def verification_values(file_id: int, result: dict[str, Any]) -> dict[str, Any]:
    """The verifications row for one result of `Verifier.verify` (the object `verify --json` prints) on the file
    `file_id`; a file that could not be verified has no coverage."""
    coverage = result["coverage"]
    return {
        "file_id": file_id,
        "checkpoint": str(Path(result["checkpoint"]).resolve()),
        "verdict": result["verdict"],
        "coverage": coverage["keys_matched"] / coverage["keys_total"] if coverage and coverage["keys_total"] else None,
        "effect": _largest_effect(result["effects"]),
        "grid_path": str(Path(result["grid"]).resolve()) if result["grid"] else None,
        "created": datetime.now(timezone.utc).replace(tzinfo=None),
        "checkpoint_sha256": result["checkpoint_sha256"],
        "reasons": result["reasons"],
        "coverage_detail": coverage,
        "effects": result["effects"],
        "parameters": result["parameters"],
        "seconds": result["seconds"],
        "version": result["version"],
        "quick": bool(result.get("quick")),
    }


def record_verification(engine: Engine, result: dict[str, Any]) -> int:
    """Store one result of `Verifier.verify`; the file is indexed first (or re-indexed if it changed), as
    `scan FILE` would. Returns the verification's id."""
    from adapterzoo.zoo.scan import scan_paths  # here: the verify queue uses this module and needs no torch

    row = Verification(**verification_values(scan_paths([result["file"]], engine).ids[0], result))
    with Session(engine) as session:
        session.add(row)
        session.commit()
        return row.id
