"""`scan`: index folders into the registry. Only new or changed files are probed and hashed.

A file is its content (one row per SHA-256); each path it is found at is a location of this host, or of a
shared root. A location is unchanged when its size, mtime and inode match the registry. A new path with the
inode, device, size and mtime of a known location whose path is gone is that file moved, recognised without
reading it; a new path whose hashed content is a file that lost a location in the same scan is a move too.
Locations under a scanned folder that are gone are flagged missing, never deleted, and another host's are
never touched. Each write is its own short transaction, so two scans can run at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import timezone
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, delete, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from tqdm import tqdm

from adapterzoo.errors import AdapterzooError, BadFileError, UnsafeFileError
from adapterzoo.formats.io.digest import digest_of
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.zoo.contents import content_id, merge_into, overwrite_content, upsert_content
from adapterzoo.zoo.events import move_action, record_event, utcnow
from adapterzoo.zoo.hashing import FileHashes, hash_file, sha256_of
from adapterzoo.zoo.hosts import Places, current_host
from adapterzoo.zoo.models import HASH_COLUMNS, FileEntry, Location, name_key
from adapterzoo.zoo.roots import load_places, under
from adapterzoo.zoo.triggers import BESIDE_SUFFIXES, find_preview, own_tokens, sidecar_stem, sidecars, trigger_words
from adapterzoo.zoo.walk import Found, find_entries, signed64

FILES = FileEntry.__table__
LOCATIONS = Location.__table__
BATCH = 500  # ids per UPDATE ... WHERE id IN (...)
_TAKEN = select(LOCATIONS.c.id).where(LOCATIONS.c.host == bindparam("to_host"),
                                      LOCATIONS.c.path == bindparam("to_path")).alias("taken")
MOVE_LOCATION = update(LOCATIONS).where(  # unless another scan recorded the new path meanwhile
    LOCATIONS.c.id == bindparam("lid"), LOCATIONS.c.path == bindparam("was"), ~exists(select(_TAKEN.c.id)),
).values(host=bindparam("to_host"), path=bindparam("to_path"), **{name: bindparam(f"to_{name}") for name in (
    "size", "mtime_ns", "inode", "device", "root_id", "preview_path", "missing", "missing_since", "last_seen",
    "name_key")})
KNOWN_COLUMNS = (LOCATIONS.c.id, LOCATIONS.c.file_id, LOCATIONS.c.host, LOCATIONS.c.path, LOCATIONS.c.size,
                 LOCATIONS.c.mtime_ns, LOCATIONS.c.inode, LOCATIONS.c.device, LOCATIONS.c.root_id,
                 LOCATIONS.c.preview_path, LOCATIONS.c.first_seen, LOCATIONS.c.last_seen, FILES.c.sha256,
                 FILES.c.is_folder, FILES.c.error, FILES.c.unsafe)


@dataclass
class ScanReport:
    """What one scan found, in the words of its summary line."""

    indexed: int = 0
    unchanged: int = 0
    moved: int = 0
    linked: int = 0
    broken: int = 0
    unsafe: int = 0
    missing: int = 0
    problems: list[dict[str, str]] = field(default_factory=list)  # status, path, error of each bad or skipped entry
    found: list[tuple[int, str]] = field(default_factory=list)  # (file id, path) of every entry found, path order
    moves: list[dict[str, Any]] = field(default_factory=list)  # file_id, action, from, to of each move recognised

    @property
    def ids(self) -> list[int]:
        return [file_id for file_id, _ in self.found]

    def summary(self) -> str:
        line = (f"{self.indexed} indexed, {self.unchanged} unchanged, {self.broken} broken, "
                f"{self.unsafe} unsafe, {self.missing} missing")
        return line + "".join(f", {n} {word}" for word, n in (("moved", self.moved), ("linked", self.linked)) if n)

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("indexed", "unchanged", "moved", "linked", "broken", "unsafe",
                                              "missing")}


@dataclass(frozen=True, slots=True)
class Seen:
    """A found entry and the location it is stored as (host '*' and the root's path on a shared root)."""

    found: Found
    host: str
    path: str
    root_id: int | None

    @property
    def key(self) -> tuple[str, str]:
        return self.host, self.path


@dataclass(slots=True)
class Known:
    """A location the registry holds, with what a rescan compares and the few facts of its file it reports."""

    id: int
    file_id: int
    host: str
    path: str
    size: int
    mtime_ns: int
    inode: int | None
    device: int | None
    root_id: int | None
    preview_path: str | None
    first_seen: Any
    last_seen: Any
    sha256: str | None
    is_folder: bool
    error: str | None
    unsafe: bool

    @property
    def key(self) -> tuple[str, str]:
        return self.host, self.path

    def unchanged(self, found: Found) -> bool:
        """Same size and mtime, and the same inode unless none was recorded or the device differs (another
        host's view of a shared root). A folder indexed before folders had digests is read once more."""
        if (self.size, self.mtime_ns) != (found.size, found.mtime_ns):
            return False
        if self.is_folder and self.sha256 is None and self.error is None:
            return False
        return self.inode is None or self.device != found.device or self.inode == found.inode


def scan_paths(paths: Sequence[str | os.PathLike], engine: Engine, progress_bar: bool = False,
               progress: Callable[[int, int, str], None] | None = None) -> ScanReport:
    """Index every model file and folder under `paths` into the registry behind `engine`, as this host's.
    `progress(done, total, path)` is called before each new or changed entry is read; what it raises stops
    the scan."""
    places = load_places(engine, current_host())
    return _Scan(engine, places, _outermost([Path(p).resolve() for p in paths]), progress_bar, progress).run()


def index_file(path: Path, engine: Engine, probed: Probed | None = None, hashes: FileHashes | None = None) -> int:
    """Index one file (as `scan FILE` would) with what the caller already knows of it; returns its file id."""
    entry = next(find_entries(Path(path).resolve()))
    places = load_places(engine, current_host())
    seen = _seen(places, entry)
    known = _known_rows(engine, [seen.key]).get(seen.key)
    return write_entry(engine, places.host, seen, index_values(entry, probed=probed, hashes=hashes), known)


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
        return Probed(None, _reason(exc, path), unsafe=True)
    except BadFileError as exc:
        return Probed(None, _reason(exc, path))
    except OSError as exc:
        return Probed(None, f"cannot read it: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a scan of thousands
        return Probed(None, f"probe failed: {exc.__class__.__name__}: {_one_line(exc)}")


def index_values(entry: Found, progress: Callable[[int], None] | None = None, probed: Probed | None = None,
                 hashes: FileHashes | None = None) -> dict[str, Any]:
    """Probe and hash one entry; a file we can't read gets kind unknown and its one-line error. A folder's
    SHA-256 is the digest of its files' (verify's). `probed` and `hashes` are used when the caller already has
    them (a download hashes as it streams)."""
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
    try:
        if entry.is_folder:
            values["sha256"] = digest_of(sha256_of(entry.path))
            if progress is not None:
                progress(entry.size)
        else:
            hashes = hashes or hash_file(entry.path, data_offset=result.data_offset if result else None,
                                         progress=progress)
            values.update({name: getattr(hashes, name) for name in HASH_COLUMNS})
    except AdapterzooError as exc:  # unreadable, or shorter than its header says
        values["error"] = values["error"] or _one_line(exc)
    stem = sidecar_stem(entry.path, entry.is_folder)
    tokens = own_tokens(values["kind"], values["details"], stem)
    values["trigger_words"] = trigger_words(values["metadata"], stem, entry.neighbours, tokens)
    values["preview_path"] = find_preview(stem, entry.neighbours)
    return values


def write_entry(engine: Engine, host: str, seen: Seen, values: dict[str, Any], known: Known | None) -> int:
    """Record what `index_values` found at `seen`: the content's file row (found by SHA-256, else new) and the
    location pointing to it, in one transaction. New content at a known path is a `replace` event: the old
    content keeps its row, sources and verifications. Returns the file id."""
    now = utcnow()
    with engine.begin() as connection:
        if known is not None and known.sha256 is None:  # its content had no SHA-256 yet: it gets one now
            file_id = _give_identity(connection, known.file_id, values, now)
        else:
            file_id = upsert_content(connection, _with_other_words(connection, seen, values), now)
        upsert_location(connection, seen, values["preview_path"], file_id, now)
        if known is not None and known.file_id != file_id and known.sha256 is not None:
            record_event(connection, host, "replace", known.file_id, seen.path, seen.path, {"file_id": file_id})
    return file_id


class _Scan:
    """One scan: walk, compare with the registry, keep the unchanged, follow moves, index the rest."""

    def __init__(self, engine: Engine, places: Places, targets: list[Path], progress_bar: bool,
                 progress: Callable[[int, int, str], None] | None = None) -> None:
        self.engine, self.places, self.targets, self.progress_bar = engine, places, targets, progress_bar
        self.progress = progress
        self.host = places.host
        self.now = utcnow()
        self.report = ScanReport()
        self.found: dict[tuple[str, str], Seen] = {}
        self.known: dict[tuple[str, str], Known] = {}
        self.results: dict[tuple[str, str], tuple[int, str, str | None, bool]] = {}  # file id, path, error, unsafe
        self.moved_from: set[tuple[str, str]] = set()
        self.new_locations: dict[int, list[Seen]] = {}  # file id -> locations this scan added at new paths

    def run(self) -> ScanReport:
        self._walk()
        self.known = _known_rows(self.engine, [self.places.stored(str(t))[:2] for t in self.targets])
        unchanged = [(row, seen) for key, row in self.known.items()
                     if (seen := self.found.get(key)) is not None and row.unchanged(seen.found)]
        self._keep(unchanged)
        kept = {seen.key for _, seen in unchanged}
        new = [seen for key, seen in sorted(self.found.items()) if key not in kept]
        followed = self._follow_inodes([seen for seen in new if seen.key not in self.known])
        self._index([seen for seen in new if seen.key not in followed])
        gone = [row for key, row in sorted(self.known.items()) if key not in self.found and key not in self.moved_from]
        gone = self._pair_moves(gone)
        self._moves_from_elsewhere()
        self._mark_missing(gone)
        self.report.missing = len(gone)
        for file_id, shown, error, unsafe in sorted(self.results.values(), key=lambda result: result[1]):
            self.report.found.append((file_id, shown))
            if error:
                status = "unsafe" if unsafe else "broken"
                setattr(self.report, status, getattr(self.report, status) + 1)
                self.report.problems.append({"status": status, "path": shown, "error": error})
        return self.report

    def _walk(self) -> None:
        for target in self.targets:
            for entry in find_entries(target):
                if not _storable(str(entry.path)):
                    shown = os.fsencode(entry.path).decode("utf-8", "replace")
                    self.report.problems.append({"status": "skipped", "path": shown,
                                                 "error": "its name is not valid UTF-8"})
                    continue
                seen = _seen(self.places, entry)
                self.found[seen.key] = seen

    def _result(self, seen: Seen, row: Known) -> None:
        self.results[seen.key] = (row.file_id, str(seen.found.path), row.error, row.unsafe)

    def _keep(self, pairs: list[tuple[Known, Seen]]) -> None:
        """Unchanged locations: seen now; inode, device and root filled in where they differ; sidecars rechecked."""
        ids = [row.id for row, _ in pairs]
        for start in range(0, len(ids), BATCH):
            with self.engine.begin() as connection:
                connection.execute(update(LOCATIONS).where(LOCATIONS.c.id.in_(ids[start:start + BATCH]))
                                   .values(last_seen=self.now, missing=False, missing_since=None))
        fixes = [{"lid": row.id, "ino": seen.found.inode, "dev": seen.found.device, "root": seen.root_id}
                 for row, seen in pairs
                 if (row.inode, row.device, row.root_id) != (seen.found.inode, seen.found.device, seen.root_id)]
        if fixes:
            with self.engine.begin() as connection:
                connection.execute(update(LOCATIONS).where(LOCATIONS.c.id == bindparam("lid"))
                                   .values(inode=bindparam("ino"), device=bindparam("dev"),
                                           root_id=bindparam("root")), fixes)
        self._touch_files({row.file_id for row, _ in pairs})
        self._refresh_sidecars(pairs)
        for row, seen in pairs:
            self._result(seen, row)
        self.report.unchanged = len(pairs)

    def _touch_files(self, file_ids: Iterable[int]) -> None:
        ids = sorted(file_ids)
        for start in range(0, len(ids), BATCH):
            with self.engine.begin() as connection:
                connection.execute(update(FILES).where(FILES.c.id.in_(ids[start:start + BATCH]))
                                   .values(last_seen=self.now))

    def _refresh_sidecars(self, pairs: list[tuple[Known, Seen]]) -> None:
        """An unchanged file whose preview or JSON sidecars changed gets new trigger words and preview.

        Only those few rows are read back and written; the model file itself is not touched again.
        """
        for row, seen in pairs:
            entry = seen.found
            name = entry.path.name if entry.is_folder else entry.path.name.rsplit(".", 1)[0]
            if row.preview_path is None and not any(name + suffix in entry.neighbours for suffix in BESIDE_SUFFIXES):
                continue  # nothing beside it, before or now: the common case, decided without a path object
            stem = sidecar_stem(entry.path, entry.is_folder)
            seen_ns = row.last_seen.replace(tzinfo=timezone.utc).timestamp() * 1e9
            preview = find_preview(stem, entry.neighbours)
            edited = any(_mtime_ns(p) > seen_ns for p in sidecars(stem, entry.neighbours))
            if preview == row.preview_path and not edited:
                continue
            with self.engine.begin() as connection:  # a transaction that starts by writing never meets a stale read
                connection.execute(update(LOCATIONS).where(LOCATIONS.c.id == row.id).values(preview_path=preview))
                file = connection.execute(select(FILES.c.metadata, FILES.c.kind, FILES.c.details)
                                          .where(FILES.c.id == row.file_id)).one()
                words = trigger_words(file.metadata, stem, entry.neighbours, own_tokens(file.kind, file.details, stem))
                words = _with_other_words(connection, seen, {"sha256": row.sha256, "trigger_words": words})[
                    "trigger_words"]
                connection.execute(update(FILES).where(FILES.c.id == row.file_id).values(trigger_words=words))

    def _follow_inodes(self, fresh: list[Seen]) -> set[tuple[str, str]]:
        """New paths that are known files under another name (same device, inode, size and mtime): moved if
        that name is gone, else a hard link. Neither is read. Returns the paths handled."""
        candidates: dict[tuple[str, int | None, int | None], list[Known]] = {}
        inodes = sorted({seen.found.inode for seen in fresh if seen.found.inode is not None})
        hosts = sorted({seen.host for seen in fresh})
        for start in range(0, len(inodes), BATCH):
            with self.engine.connect() as connection:
                rows = connection.execute(select(*KNOWN_COLUMNS).join(FILES, FILES.c.id == LOCATIONS.c.file_id)
                                          .where(LOCATIONS.c.inode.in_(inodes[start:start + BATCH]),
                                                 LOCATIONS.c.host.in_(hosts))).all()
            for row in rows:
                known = Known(*row)
                candidates.setdefault((known.host, known.device, known.inode), []).append(known)
        follows: list[tuple[Known, Seen, Known | None]] = []  # (row, new place, the row as it was if it moves)
        for seen in fresh:
            entry = seen.found
            same = [row for row in candidates.get((seen.host, entry.device, entry.inode), [])
                    if (row.size, row.mtime_ns, row.is_folder) == (entry.size, entry.mtime_ns, entry.is_folder)
                    and row.key != seen.key]
            if not same:
                continue
            gone = next((row for row in same if self._gone(row)), None)
            if gone is None:
                follows.append((same[0], seen, None))
                continue
            before = replace(gone)
            gone.host, gone.path, gone.root_id = seen.host, seen.path, seen.root_id  # later links see it here
            self.moved_from.add(before.key)
            follows.append((gone, seen, before))
        return self._write_follows(follows)

    def _write_follows(self, follows: list[tuple[Known, Seen, Known | None]]) -> set[tuple[str, str]]:
        """Record the moves and links `_follow_inodes` found, many to a transaction; a move another scan recorded
        meanwhile is left to it."""
        handled = set()
        for start in range(0, len(follows), BATCH):
            with self.engine.begin() as connection:
                for row, seen, before in follows[start:start + BATCH]:
                    if not self._record_follow(connection, row, seen, before):
                        if before is not None:
                            self.moved_from.discard(before.key)
                        continue
                    handled.add(seen.key)
                    self._result(seen, row)
                    if before is None:
                        self.report.linked += 1
                    else:
                        self._moved(before, seen)
        self._touch_files({row.file_id for row, seen, _ in follows if seen.key in handled})
        return handled

    def _record_follow(self, connection: Connection, row: Known, seen: Seen, before: Known | None) -> bool:
        entry = seen.found
        preview = find_preview(sidecar_stem(entry.path, entry.is_folder), entry.neighbours)
        if before is None:
            upsert_location(connection, seen, preview, row.file_id, self.now)
            return True
        values = {"host": seen.host, "path": seen.path, "size": entry.size, "mtime_ns": entry.mtime_ns,
                  "inode": entry.inode, "device": entry.device, "root_id": seen.root_id, "preview_path": preview,
                  "missing": False, "missing_since": None, "last_seen": self.now, "name_key": name_key(seen.path)}
        moved = connection.execute(MOVE_LOCATION, {"lid": row.id, "was": before.path,
                                                   **{f"to_{k}": v for k, v in values.items()}}).rowcount
        if moved:
            record_event(connection, self.host, move_action(before.path, seen.path), row.file_id, before.path,
                         seen.path, {"recognised_by": "inode"})
        return bool(moved)

    def _gone(self, row: Known) -> bool:
        """Whether a known location's path no longer holds its file (checked on disk outside the scanned folders)."""
        if row.key in self.found:
            return False
        if row.key in self.known:
            return True
        local = self.places.local(row.host, row.path, row.root_id)
        if local is None:
            return False
        try:
            stat = os.lstat(local)
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False  # cannot tell: leave it be
        return (signed64(stat.st_dev), signed64(stat.st_ino)) != (row.device, row.inode)

    def _moved(self, row: Known, seen: Seen) -> None:
        """Report `row` (as it was) moved to `seen`."""
        self.moved_from.add(row.key)
        self.report.moved += 1
        self.report.moves.append({"file_id": row.file_id, "action": move_action(row.path, seen.path),
                                  "from": self.places.local(row.host, row.path, row.root_id) or row.path,
                                  "to": str(seen.found.path)})

    def _index(self, todo: list[Seen]) -> None:
        with tqdm(total=sum(s.found.size for s in todo), unit="B", unit_scale=True, desc="scan",
                  disable=None if self.progress_bar else True) as bar:
            for done, seen in enumerate(todo):
                if self.progress is not None:
                    self.progress(done, len(todo), str(seen.found.path))
                bar.set_postfix_str(seen.found.path.name[-40:], refresh=False)
                values = index_values(seen.found, bar.update)
                known = self.known.get(seen.key)
                file_id = write_entry(self.engine, self.host, seen, values, known)
                self.results[seen.key] = (file_id, str(seen.found.path), values["error"], values["unsafe"])
                if known is None:
                    self.new_locations.setdefault(file_id, []).append(seen)
        self.report.indexed = len(todo)

    def _pair_moves(self, gone: list[Known]) -> list[Known]:
        """A gone location whose file turned up at a new path in this scan moved there (it was hashed: another
        file system, or a copy and a delete). Returns the gone locations left."""
        left = []
        for row in gone:
            arrivals = self.new_locations.get(row.file_id)
            if not arrivals:
                left.append(row)
                continue
            seen = arrivals.pop(0)
            with self.engine.begin() as connection:
                connection.execute(delete(LOCATIONS).where(LOCATIONS.c.id == row.id))
                connection.execute(update(LOCATIONS).where(LOCATIONS.c.host == seen.host,
                                                           LOCATIONS.c.path == seen.path)
                                   .values(first_seen=row.first_seen))
                record_event(connection, self.host, move_action(row.path, seen.path), row.file_id, row.path,
                             seen.path, {"recognised_by": "sha256"})
            self._moved(row, seen)
        return left

    def _moves_from_elsewhere(self) -> None:
        """A file that turned up at a new path and whose location outside the scanned folders is gone (its
        folder is there, the file is not) moved here from there."""
        waiting = {file_id: arrivals[0] for file_id, arrivals in self.new_locations.items() if arrivals}
        if not waiting:
            return
        with self.engine.connect() as connection:
            rows = [Known(*r) for r in connection.execute(
                select(*KNOWN_COLUMNS).join(FILES, FILES.c.id == LOCATIONS.c.file_id).where(
                    LOCATIONS.c.file_id.in_(sorted(waiting)), LOCATIONS.c.missing.is_(False)))]
        for row in rows:
            seen = waiting.get(row.file_id)
            if seen is None or row.key in self.found or row.key in self.known or row.host != seen.host:
                continue
            local = self.places.local(row.host, row.path, row.root_id)
            if local is None or os.path.lexists(local) or not os.path.isdir(os.path.dirname(local)):
                continue  # still there, or its folder is not (an unplugged drive): not a move
            del waiting[row.file_id]
            self._pair_moves([row])

    def _mark_missing(self, rows: list[Known]) -> None:
        ids = [row.id for row in rows]
        for start in range(0, len(ids), BATCH):
            chunk = ids[start:start + BATCH]
            with self.engine.begin() as connection:
                connection.execute(update(LOCATIONS).where(LOCATIONS.c.id.in_(chunk)).values(missing=True))
                connection.execute(update(LOCATIONS).where(LOCATIONS.c.id.in_(chunk),
                                                           LOCATIONS.c.missing_since.is_(None))
                                   .values(missing_since=self.now))


def _give_identity(connection: Connection, file_id: int, values: dict[str, Any], now: Any) -> int:
    """A row whose content had no SHA-256 (unreadable before, or a folder from before folder digests) learns
    it: it keeps its id, unless that content is already a row, which it is folded into."""
    existing = content_id(connection, values["sha256"]) if values["sha256"] else None
    if existing is None or existing == file_id:
        overwrite_content(connection, file_id, values, now)
        return file_id
    merge_into(connection, existing, [file_id])
    return upsert_content(connection, values, now)


def _with_other_words(connection: Connection, seen: Seen, values: dict[str, Any]) -> dict[str, Any]:
    """A content found at several paths keeps the trigger words the sidecars of each gave: the words found
    here come first, then those it already had, when it has another location."""
    if not values["sha256"]:
        return values
    row = connection.execute(select(FILES.c.id, FILES.c.trigger_words).where(FILES.c.sha256 == values["sha256"])) \
        .first()
    if row is None:
        return values
    others = connection.execute(select(func.count()).select_from(LOCATIONS).where(
        LOCATIONS.c.file_id == row.id, or_(LOCATIONS.c.host != seen.host, LOCATIONS.c.path != seen.path))).scalar()
    if not others:
        return values
    words = list(values["trigger_words"])
    words += [w for w in row.trigger_words if w.lower() not in {v.lower() for v in words}]
    return {**values, "trigger_words": words}


def upsert_location(connection: Connection, seen: Seen, preview: str | None, file_id: int, now: Any) -> int:
    """Insert the location or, if (host, path) is there already, overwrite all but id and first_seen."""
    entry = seen.found
    row = {"file_id": file_id, "host": seen.host, "path": seen.path, "size": entry.size, "mtime_ns": entry.mtime_ns,
           "inode": entry.inode, "device": entry.device, "root_id": seen.root_id, "preview_path": preview,
           "missing": False, "missing_since": None, "first_seen": now, "last_seen": now,
           "name_key": name_key(seen.path)}
    return connection.execute(_location_upsert(connection.dialect.name), row).scalar_one()


@cache
def _location_upsert(dialect_name: str) -> Any:
    """INSERT ... ON CONFLICT (host, path) DO UPDATE all but id and first_seen, built once."""
    statement = (sqlite if dialect_name == "sqlite" else postgresql).insert(LOCATIONS)
    kept = {"id", "host", "path", "first_seen"}
    return statement.on_conflict_do_update(
        index_elements=[LOCATIONS.c.host, LOCATIONS.c.path],
        set_={c.name: statement.excluded[c.name] for c in LOCATIONS.columns if c.name not in kept},
    ).returning(LOCATIONS.c.id)


def _seen(places: Places, entry: Found) -> Seen:
    return Seen(entry, *places.stored(str(entry.path)))


def _outermost(paths: list[Path]) -> list[Path]:
    """The folders to walk: each given once, none inside another (it would be walked twice)."""
    unique = sorted(set(paths), key=lambda p: len(p.parts))
    kept: list[Path] = []
    for path in unique:
        if not any(path.is_relative_to(k) for k in kept):
            kept.append(path)
    return kept


def _storable(path: str) -> bool:
    """Databases keep UTF-8 text; a name with undecodable bytes (surrogates here) can't be a key."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reason(exc: BaseException, path: Path) -> str:
    """The reason kept in the registry is about the content: without the file name the reader's error starts
    with, which a rename would make wrong (every view shows the path beside it)."""
    return _one_line(exc).removeprefix(f"{path.name}: ")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


def _known_rows(engine: Engine, places: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Known]:
    """The locations the registry holds under the scanned (host, path) places: just what a rescan compares."""
    conditions = [and_(LOCATIONS.c.host == host, under(LOCATIONS.c.path, path)) for host, path in places]
    if not conditions:
        return {}
    statement = select(*KNOWN_COLUMNS).join(FILES, FILES.c.id == LOCATIONS.c.file_id).where(or_(*conditions))
    with engine.connect() as connection:
        return {(row.host, row.path): Known(*row) for row in connection.execute(statement)}


def _mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
