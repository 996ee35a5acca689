"""`dupes` and `du`: what this host's copies cost, from the registry alone (no file is read).

Copies are the present locations this host reaches. Copies that share an inode (hard links, or symlinks
a scan followed) are one set of bytes on disk: they are counted once and freeing them frees nothing.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from adapterzoo.zoo.hosts import Places, current_host
from adapterzoo.zoo.models import FileEntry, Location, Source, Verification
from adapterzoo.zoo.queries import reached_by
from adapterzoo.zoo.roots import load_places

BY = ("sha256", "tensors", "name")
DU_BY = ("kind", "base", "root", "source")


@dataclass(slots=True)
class Copy:
    """One present copy on this host, with what a choice between copies looks at."""

    file_id: int
    location_id: int
    path: str
    size: int
    mtime_ns: int
    inode: int | None
    device: int | None
    root: dict[str, Any] | None
    sha256: str | None
    autov3: str | None
    kind: str
    base: str
    is_folder: bool
    sources: list[str]  # providers
    verdict: str | None  # latest verification
    linked: bool = False  # shares its bytes (inode) with a copy listed before it

    @property
    def disk(self) -> tuple[Any, ...]:
        """What identifies the bytes on disk: (device, inode), else the path."""
        return (self.device, self.inode) if self.inode is not None else (self.path,)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__ if name not in ("inode", "device", "location_id")}


@dataclass
class Group:
    """Copies that are one thing by some measure: same bytes, same tensors, or the same name."""

    by: str
    key: str
    copies: list[Copy]
    bytes_freed: int | None  # what keeping only the newest copy would free; None for a name clash
    newest: str = field(init=False)

    def __post_init__(self) -> None:
        self.newest = max(self.copies, key=lambda c: (c.mtime_ns, c.path)).path

    def to_json(self) -> dict[str, Any]:
        return {"by": self.by, "key": self.key, "bytes_freed": self.bytes_freed, "newest": self.newest,
                "with_sources": [c.path for c in self.copies if c.sources],
                "passed": [c.path for c in self.copies if c.verdict == "pass"],
                "copies": [c.to_json() for c in self.copies]}


def copies_here(engine: Engine) -> list[Copy]:
    """Every present copy this host reaches, by path, marked when its bytes were already listed."""
    host = current_host()
    places = load_places(engine, host)
    statement = select(Location.id, Location.file_id, Location.host, Location.path, Location.size,
                       Location.mtime_ns, Location.inode, Location.device, Location.root_id, FileEntry.sha256,
                       FileEntry.autov3, FileEntry.kind, FileEntry.base, FileEntry.is_folder) \
        .join(FileEntry, FileEntry.id == Location.file_id).where(Location.missing.is_(False), reached_by(host))
    latest = select(func.max(Verification.id)).group_by(Verification.file_id)
    with engine.connect() as connection:
        rows = connection.execute(statement).all()
        providers: dict[int, list[str]] = defaultdict(list)
        for file_id, provider in connection.execute(select(Source.file_id, Source.provider).distinct()):
            providers[file_id].append(provider)
        verdicts = dict(connection.execute(select(Verification.file_id, Verification.verdict)
                                           .where(Verification.id.in_(latest))).all())
    roots = {root.id: _root(places, root.id) for root in places.roots}
    copies = [Copy(row.file_id, row.id, local, row.size, row.mtime_ns, row.inode, row.device,
                   roots.get(row.root_id), row.sha256, row.autov3, row.kind, row.base, row.is_folder,
                   sorted(providers.get(row.file_id, [])), verdicts.get(row.file_id))
              for row in rows if (local := places.local(row.host, row.path, row.root_id)) is not None]
    copies.sort(key=lambda c: c.path)
    seen: set[tuple[Any, ...]] = set()
    for copy in copies:
        copy.linked = copy.disk in seen
        seen.add(copy.disk)
    return copies


def find_dupes(engine: Engine, by: str = "sha256") -> list[Group]:
    """Groups of this host's copies: the same bytes (sha256), the same tensors under other metadata (tensors:
    AutoV3, a re-saved or re-tagged copy), or the same file name with other content (name). Largest saving
    first."""
    copies = copies_here(engine)
    keyed: dict[str, list[Copy]] = defaultdict(list)
    for copy in copies:
        key = {"sha256": copy.sha256, "tensors": copy.autov3,
               "name": os.path.basename(copy.path).lower()}[by]
        if key:
            keyed[key].append(copy)
    groups = []
    for key, members in keyed.items():
        contents = {c.file_id for c in members}
        if by == "sha256" and len(members) > 1 and contents == {members[0].file_id}:
            groups.append(Group(by, key, members, _freed(members)))
        elif by != "sha256" and len(contents) > 1:
            groups.append(Group(by, key, members, _freed(members) if by == "tensors" else None))
    return sorted(groups, key=lambda g: (-(g.bytes_freed or 0), g.key))


def disk_use(engine: Engine, by: str = "kind") -> list[dict[str, Any]]:
    """Sizes and counts of this host's copies per kind, base, root or source; bytes on disk (shared inodes
    once). Largest first."""
    totals: dict[str, dict[str, Any]] = {}
    for copy in copies_here(engine):
        if by == "root":
            group = "(no root)" if copy.root is None else f"{copy.root['path']} ({_root_label(copy.root)})"
        elif by == "source":
            group = ",".join(copy.sources) or "(none)"
        else:
            group = getattr(copy, by)
        row = totals.setdefault(group, {"group": group, "files": set(), "copies": 0, "bytes": 0})
        row["files"].add(copy.file_id)
        row["copies"] += 1
        row["bytes"] += 0 if copy.linked else copy.size
    rows = [{**row, "files": len(row["files"])} for row in totals.values()]
    return sorted(rows, key=lambda r: (-r["bytes"], r["group"]))


def _freed(members: list[Copy]) -> int:
    """Bytes on disk of all but the newest copy, each set of bytes (inode) once."""
    newest = max(members, key=lambda c: (c.mtime_ns, c.path))
    disks = {c.disk: c.size for c in members}
    return sum(disks.values()) - disks[newest.disk]


def _root(places: Places, root_id: int | None) -> dict[str, Any] | None:
    root = places.root(root_id)
    return None if root is None else {"id": root.id, "path": root.local, "layout": root.layout, "kind": root.kind,
                                      "shared": root.shared}


def _root_label(root: dict[str, Any]) -> str:
    return root["layout"] + (f" {root['kind']}" if root["kind"] else "")
