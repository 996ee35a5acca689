"""`dedupe`: identical copies on this host become links to one kept copy, so the bytes are on disk once and
every UI still finds the file where it looks.

Each copy is compared byte for byte with the kept one right before it is replaced (the stored hash is not
trusted alone); the link is made under a temporary name beside the copy and renamed over it, so a copy is
either untouched or a link, never half gone. Hard links stay within one file system.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, update

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.dupes import Copy, find_dupes
from adapterzoo.zoo.events import record_event
from adapterzoo.zoo.hosts import current_host
from adapterzoo.zoo.models import Location
from adapterzoo.zoo.walk import signed64

KEEP = ("newest", "oldest", "first-root")
LINKS = ("hard", "sym")
CHUNK = 8 << 20
LOCATIONS = Location.__table__


@dataclass
class Linked:
    """What dedupe did (or would do) to one copy."""

    id: int
    kept: str
    path: str
    status: str  # linked | would link | skipped | failed
    bytes_freed: int = 0
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def keeper(copies: list[Copy], keep: str) -> Copy:
    """The copy the others will point to: the newest, the oldest, or the one in the root added first."""
    if keep == "newest":
        return max(copies, key=lambda c: (c.mtime_ns, c.path))
    if keep == "oldest":
        return min(copies, key=lambda c: (c.mtime_ns, c.path))
    return min(copies, key=lambda c: (c.root["id"] if c.root else float("inf"), c.path))


def dedupe(engine: Engine, keep: str = "newest", link: str = "hard", dry_run: bool = False) -> list[Linked]:
    """Replace every identical copy on this host by a `link` to the one `keep` chooses."""
    if keep not in KEEP or link not in LINKS:
        raise AdapterzooError(f"--keep is one of {', '.join(KEEP)} and --link one of {', '.join(LINKS)}")
    host = current_host()
    outcomes = []
    for group in find_dupes(engine, "sha256"):
        kept = keeper(group.copies, keep)
        for copy in group.copies:
            if copy is kept:
                continue
            outcome = _plan(kept, copy, link)
            if outcome.status == "would link" and not dry_run:
                outcome = _link(engine, host, kept, copy, link)
            outcomes.append(outcome)
    return outcomes


def _plan(kept: Copy, copy: Copy, link: str) -> Linked:
    def skipped(reason: str) -> Linked:
        return Linked(copy.file_id, kept.path, copy.path, "skipped", reason=reason)

    if copy.is_folder:
        return skipped("a folder: only files are linked")
    if copy.disk == kept.disk:
        return skipped("already the same file on disk (a link)")
    if link == "hard" and copy.device != kept.device:
        return skipped("on another file system than the kept copy: a hard link cannot cross it (--link sym can)")
    try:
        nlink = os.stat(copy.path, follow_symlinks=False).st_nlink
    except OSError as exc:
        return skipped(f"cannot read it: {exc.strerror or exc}")
    return Linked(copy.file_id, kept.path, copy.path, "would link", copy.size if nlink == 1 else 0)


def _link(engine: Engine, host: str, kept: Copy, copy: Copy, link: str) -> Linked:
    """Compare, link under a temporary name, check nothing changed, rename over the copy; record it."""
    target = Path(copy.path)
    before = _unchanged_since_scan(copy)
    if isinstance(before, str):
        return Linked(copy.file_id, kept.path, copy.path, "skipped", reason=before)
    if isinstance(_unchanged_since_scan(kept), str):
        return Linked(copy.file_id, kept.path, copy.path, "skipped",
                      reason=f"the kept copy {kept.path} changed since the last scan: scan again first")
    tmp = None
    try:
        if not same_bytes(Path(kept.path), target):
            return Linked(copy.file_id, kept.path, copy.path, "skipped", reason="its bytes differ from the kept "
                          "copy's (changed since the last scan?): scan again")
        tmp = _free_name(target)
        if link == "hard":
            os.link(kept.path, tmp)
        else:
            os.symlink(os.path.abspath(kept.path), tmp)
        if _unchanged_since_scan(copy) != before:
            raise AdapterzooError("it changed while being compared")
        os.replace(tmp, target)
        tmp = None
    except (OSError, AdapterzooError) as exc:
        return Linked(copy.file_id, kept.path, copy.path, "failed",
                      reason=str(exc) if isinstance(exc, AdapterzooError) else f"{exc.strerror or exc}; left as it was")
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    stat = os.stat(target)
    with engine.begin() as connection:
        connection.execute(update(LOCATIONS).where(LOCATIONS.c.id == copy.location_id).values(
            inode=signed64(stat.st_ino), device=signed64(stat.st_dev), mtime_ns=stat.st_mtime_ns, size=stat.st_size))
        record_event(connection, host, "dedupe", copy.file_id, copy.path, kept.path,
                     {"link": link, "bytes_freed": _freed(before)})
    return Linked(copy.file_id, kept.path, copy.path, "linked", _freed(before))


def same_bytes(a: Path, b: Path) -> bool:
    """Byte-for-byte equality, read in chunks."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return False
        while True:
            left, right = fa.read(CHUNK), fb.read(CHUNK)
            if left != right:
                return False
            if not left:
                return True


def _unchanged_since_scan(copy: Copy) -> tuple[int, ...] | str:
    """The copy's (size, mtime, inode, links) if it is as the last scan saw it, else why not."""
    try:
        stat = os.stat(copy.path, follow_symlinks=False)
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if (stat.st_size, stat.st_mtime_ns) != (copy.size, copy.mtime_ns):
        return "changed since the last scan: scan again first"
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_nlink


def _freed(before: tuple[int, ...]) -> int:
    size, _, _, nlink = before
    return size if nlink == 1 else 0


def _free_name(target: Path) -> str:
    """A name beside `target` that nothing has (hidden: a scan skips it)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".link.tmp", dir=target.parent)
    os.close(fd)
    os.unlink(name)
    return name
