"""Which machine this is, and how a path on it maps to a location in a registry shared by many.

A host is named by ADAPTERZOO_HOST (default: the hostname). A location on a shared root is stored once,
with host '*' and its path under the root's own path; each host reaches it through its mount of the root.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import re
import socket
from dataclasses import dataclass

from adapterzoo.errors import AdapterzooError

SHARED_HOST = "*"  # the host of a shared root and of the locations on it
_SEPARATORS = re.compile(r"[\\/]+")


def current_host() -> str:
    """ADAPTERZOO_HOST, else the machine's hostname."""
    host = os.environ.get("ADAPTERZOO_HOST", "").strip() or socket.gethostname()
    if host == SHARED_HOST:
        raise AdapterzooError(f"ADAPTERZOO_HOST={SHARED_HOST!r} is reserved for shared roots; name this machine")
    return host


def is_under(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or inside it (text only: both absolute, either separator)."""
    folder = folder.rstrip("/\\")
    return path == folder or (path.startswith(folder) and path[len(folder)] in "/\\")


def translate(path: str, source: str, target: str) -> str:
    """`path`, which is under folder `source`, as the same place under folder `target`; the separator follows
    `target` (a Windows host may mount what a Linux host scanned)."""
    rest = [part for part in _SEPARATORS.split(path[len(source.rstrip("/\\")):]) if part]
    join = ntpath.join if "\\" in target or re.match(r"[A-Za-z]:", target) else posixpath.join
    return join(target, *rest) if rest else target


@dataclass(frozen=True)
class RootView:
    """A root as one host sees it: `local` is where that host finds it (its mount, for a shared root)."""

    id: int
    host: str
    path: str
    local: str
    layout: str
    kind: str | None
    label: str | None

    @property
    def shared(self) -> bool:
        return self.host == SHARED_HOST

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "host": self.host, "path": self.local, "stored_path": self.path,
                "shared": self.shared, "layout": self.layout, "kind": self.kind, "label": self.label}


class Places:
    """The roots one host can reach, and the translation between its paths and stored locations."""

    def __init__(self, host: str, roots: list[RootView]) -> None:
        self.host = host
        self.roots = roots
        self._shared = sorted((r for r in roots if r.shared), key=lambda r: len(r.local), reverse=True)
        self._own = sorted((r for r in roots if not r.shared), key=lambda r: len(r.local), reverse=True)

    def stored(self, local_path: str) -> tuple[str, str, int | None]:
        """(host, path, root id) a location at `local_path` on this host is stored under."""
        for root in self._shared:
            if is_under(local_path, root.local):
                return SHARED_HOST, translate(local_path, root.local, root.path), root.id
        for root in self._own:
            if is_under(local_path, root.local):
                return self.host, local_path, root.id
        return self.host, local_path, None

    def root(self, root_id: int | None) -> RootView | None:
        return next((r for r in self.roots if r.id == root_id), None)

    def local(self, host: str, path: str, root_id: int | None) -> str | None:
        """Where this host finds a stored location, or None when it cannot reach it."""
        if host == self.host:
            return path
        root = self.root(root_id) if host == SHARED_HOST else None
        return translate(path, root.path, root.local) if root is not None else None
