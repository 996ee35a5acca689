"""`scan`: index folders into the registry. Only new or changed files are probed and hashed.

A file is unchanged when its size and mtime match the registry; entries under a scanned folder
that are gone are flagged missing, never deleted. Each entry is written by an upsert on its
unique path in its own short transaction, so two scans of one folder can run at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from tqdm import tqdm

from adapterzoo.errors import AdapterzooError, BadFileError, UnsafeFileError
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.zoo.hashing import FileHashes, hash_file
from adapterzoo.zoo.models import HASH_COLUMNS, FileEntry
from adapterzoo.zoo.triggers import find_preview, sidecar_stem, sidecars, trigger_words
from adapterzoo.zoo.walk import Found, find_entries

FILES = FileEntry.__table__
BATCH = 500  # ids per UPDATE ... WHERE id IN (...)


@dataclass
class ScanReport:
    """What one scan found, in the words of its summary line."""

    indexed: int = 0
    unchanged: int = 0
    broken: int = 0
    unsafe: int = 0
    missing: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)  # status, path, error of each bad or skipped entry
    ids: list[int] = field(default_factory=list)  # every entry found, in path order

    def summary(self) -> str:
        return (
            f"{self.indexed} indexed, {self.unchanged} unchanged, {self.broken} broken, "
            f"{self.unsafe} unsafe, {self.missing} missing"
        )

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("indexed", "unchanged", "broken", "unsafe", "missing")}


def scan_paths(paths: Sequence[str | os.PathLike], engine: Engine, progress_bar: bool = False,
               progress: Callable[[int, int, str], None] | None = None) -> ScanReport:
    """Index every model file and folder under `paths` into the registry behind `engine`. `progress(done,
    total, path)` is called before each new or changed entry is read; what it raises stops the scan."""
    roots = [Path(p).resolve() for p in paths]
    found = {str(f.path): f for root in roots for f in find_entries(root)}
    known = _known_rows(engine, roots)
    now = _utcnow()
    report = ScanReport()
    for path in [p for p in found if not _storable(p)]:
        del found[path]
        shown = os.fsencode(path).decode("utf-8", "replace")
        report.problems.append({"status": "skipped", "path": shown, "error": "its name is not valid UTF-8"})

    unchanged = [
        row for path, row in known.items()
        if path in found and (row.size, row.mtime_ns) == (found[path].size, found[path].mtime_ns)
    ]
    _refresh_sidecars(engine, [(row, found[row.path]) for row in unchanged])
    _touch(engine, [row.id for row in unchanged], now)
    report.unchanged = len(unchanged)
    results: dict[str, tuple[int, str | None, bool]] = {row.path: (row.id, row.error, row.unsafe) for row in unchanged}

    todo = [f for path, f in sorted(found.items()) if path not in results]
    with tqdm(total=sum(f.size for f in todo), unit="B", unit_scale=True, desc="scan",
              disable=None if progress_bar else True) as bar:
        for done, entry in enumerate(todo):
            if progress is not None:
                progress(done, len(todo), str(entry.path))
            bar.set_postfix_str(entry.path.name[-40:], refresh=False)
            values = index_values(entry, bar.update)
            results[str(entry.path)] = (_upsert(engine, values, now), values["error"], values["unsafe"])
    report.indexed = len(todo)

    gone = [row.id for path, row in known.items() if path not in found]
    _mark_missing(engine, gone)
    report.missing = len(gone)

    for path, (row_id, error, unsafe) in sorted(results.items()):
        report.ids.append(row_id)
        if error:
            status = "unsafe" if unsafe else "broken"
            setattr(report, status, getattr(report, status) + 1)
            report.problems.append({"status": status, "path": path, "error": error})
    return report


@dataclass(frozen=True)
class Probed:
    """What probing one entry gave: the result, or the one-line reason it failed (`unsafe`: a pickle refused)."""

    result: ProbeResult | None
    error: str | None = None
    unsafe: bool = False


def probe_entry(path: Path) -> Probed:
    """Probe a file or folder; never raises for a bad file (a scan of thousands must go on)."""
    from adapterzoo.formats.probe import (
        probe,  # imports torch: only when something needs probing
    )

    try:
        return Probed(probe(path))
    except UnsafeFileError as exc:
        return Probed(None, _one_line(exc), unsafe=True)
    except BadFileError as exc:
        return Probed(None, _one_line(exc))
    except OSError as exc:
        return Probed(None, f"cannot read it: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a scan of thousands
        return Probed(None, f"probe failed: {exc.__class__.__name__}: {_one_line(exc)}")


def index_values(entry: Found, progress: Callable[[int], None] | None = None, probed: Probed | None = None,
                 hashes: FileHashes | None = None) -> dict[str, Any]:
    """Probe and hash one entry; a file we can't read gets kind unknown and its one-line error.
    `probed` and `hashes` are used when the caller already has them (a download hashes as it streams)."""
    values: dict[str, Any] = {
        "path": str(entry.path), "is_folder": entry.is_folder, "size": entry.size, "mtime_ns": entry.mtime_ns,
        "kind": "unknown", "base": "unknown", "format": None, "rank": None, "alpha": None, "dtype": None,
        "tensors": 0, "metadata": {}, "details": {}, "warnings": [], "error": None, "unsafe": False,
        **dict.fromkeys(HASH_COLUMNS),
    }
    probed = probed or probe_entry(entry.path)
    values.update(error=probed.error, unsafe=probed.unsafe)
    result = probed.result
    if result is not None:
        values.update(
            kind=result.kind, base=result.base, format=result.format, rank=result.rank, alpha=result.alpha,
            dtype=result.dtype, tensors=result.tensors, metadata=result.metadata, details=result.details,
            warnings=result.warnings,
        )
    if not entry.is_folder:
        try:
            hashes = hashes or hash_file(entry.path, data_offset=result.data_offset if result else None,
                                       progress=progress)
        except AdapterzooError as exc:  # unreadable, or shorter than its header says
            values["error"] = values["error"] or _one_line(exc)
        else:
            values.update({name: getattr(hashes, name) for name in HASH_COLUMNS})
    elif progress is not None:
        progress(entry.size)
    stem = sidecar_stem(entry.path, entry.is_folder)
    values["trigger_words"] = trigger_words(values["metadata"], stem, entry.neighbours)
    values["preview_path"] = find_preview(stem, entry.neighbours)
    return values


def index_file(path: Path, engine: Engine, probed: Probed | None = None, hashes: FileHashes | None = None) -> int:
    """Index one file (as `scan FILE` would) with what the caller already knows of it; returns its id."""
    entry = next(find_entries(Path(path).resolve()))
    return _upsert(engine, index_values(entry, probed=probed, hashes=hashes), _utcnow())


def _storable(path: str) -> bool:
    """Databases keep UTF-8 text; a name with undecodable bytes (surrogates here) can't be a key."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _under(root: Path) -> Any:
    prefix = str(root) if str(root).endswith(os.sep) else str(root) + os.sep
    return or_(FileEntry.path == str(root), FileEntry.path.startswith(prefix, autoescape=True))


def _known_rows(engine: Engine, roots: Iterable[Path]) -> dict[str, Any]:
    """What the registry already holds under the scanned folders: just what a rescan compares."""
    columns = (FileEntry.id, FileEntry.path, FileEntry.size, FileEntry.mtime_ns, FileEntry.error,
               FileEntry.unsafe, FileEntry.preview_path, FileEntry.last_seen)
    with engine.connect() as connection:
        rows = connection.execute(select(*columns).where(or_(*(_under(root) for root in roots)))).all()
    return {row.path: row for row in rows}


def _touch(engine: Engine, ids: list[int], now: datetime) -> None:
    for start in range(0, len(ids), BATCH):
        with engine.begin() as connection:
            connection.execute(
                update(FILES).where(FILES.c.id.in_(ids[start:start + BATCH])).values(last_seen=now, missing=False)
            )


def _mark_missing(engine: Engine, ids: list[int]) -> None:
    for start in range(0, len(ids), BATCH):
        with engine.begin() as connection:
            connection.execute(update(FILES).where(FILES.c.id.in_(ids[start:start + BATCH])).values(missing=True))


def _refresh_sidecars(engine: Engine, pairs: list[tuple[Any, Found]]) -> None:
    """An unchanged file whose preview or JSON sidecars changed gets new trigger words and preview.

    Only those few rows are read back and written; the model file itself is not touched again.
    """
    for row, entry in pairs:
        stem = sidecar_stem(entry.path, entry.is_folder)
        seen_ns = row.last_seen.replace(tzinfo=timezone.utc).timestamp() * 1e9
        preview = find_preview(stem, entry.neighbours)
        edited = any(_mtime_ns(p) > seen_ns for p in sidecars(stem, entry.neighbours))
        if preview == row.preview_path and not edited:
            continue
        with engine.connect() as connection:
            metadata = connection.execute(select(FILES.c.metadata).where(FILES.c.id == row.id)).scalar_one()
        words = trigger_words(metadata, stem, entry.neighbours)
        with engine.begin() as connection:  # a transaction that starts by writing never meets a stale read
            connection.execute(
                update(FILES).where(FILES.c.id == row.id).values(trigger_words=words, preview_path=preview)
            )


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _upsert(engine: Engine, values: dict[str, Any], now: datetime) -> int:
    """Insert the entry or, if its path is already there, overwrite all but id and first_seen."""
    dialect = sqlite if engine.dialect.name == "sqlite" else postgresql
    statement = dialect.insert(FILES).values(**values, missing=False, first_seen=now, last_seen=now)
    kept = {"id", "path", "first_seen"}
    statement = statement.on_conflict_do_update(
        index_elements=[FILES.c.path],
        set_={c.name: statement.excluded[c.name] for c in FILES.columns if c.name not in kept},
    ).returning(FILES.c.id)
    with engine.begin() as connection:
        return connection.execute(statement).scalar_one()
