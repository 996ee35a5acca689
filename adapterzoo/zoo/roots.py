"""Roots: the folders a bare `scan` rescans, each a UI's install or one of its model folders.

A root is a host's (its ADAPTERZOO_HOST) or shared (host '*'): one storage, a NAS, that each host mounts at
its own path (root_mounts). Locations under a shared root are stored once, under the root's own path, so a
file scanned from one host is known at its path on every host that mounts the root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.events import utcnow
from adapterzoo.zoo.hosts import SHARED_HOST, Places, RootView, current_host, is_under, translate
from adapterzoo.zoo.models import Location, Root, RootMount, name_key

LAYOUTS = ("a1111", "comfyui", "invoke", "plain")
LOCATIONS = Location.__table__


@dataclass
class RootChange:
    """What `roots add`, `mount` or `remove` did: the root, in words, and how many locations moved with it."""

    root: dict[str, Any]
    status: str  # added | already | mounted | removed | unmounted
    locations: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "locations": self.locations, **self.root}


def under(column: Any, folder: str) -> Any:
    """SQL: `column` is the path `folder` or a path inside it (either separator)."""
    base = folder.rstrip("/\\")
    return or_(column == folder, column.startswith(base + "/", autoescape=True),
               column.startswith(base + "\\", autoescape=True))


def load_places(engine: Engine, host: str) -> Places:
    """The roots `host` can reach: its own, and the shared ones it mounts."""
    with Session(engine) as session:
        roots = session.scalars(select(Root).where(Root.host.in_([host, SHARED_HOST])).order_by(Root.id)).all()
        views = [_view(r, local) for r in roots if (local := r.local_path(host)) is not None]
    return Places(host, views)


def roots_to_scan(engine: Engine) -> tuple[list[str], list[str]]:
    """(the roots this host reaches that are there, those that are not): a bare `scan` walks the first and
    leaves what it knows under the others alone (a drive unplugged is not a library deleted)."""
    places = load_places(engine, current_host())
    there = [root.local for root in places.roots if os.path.isdir(root.local)]
    return there, [root.local for root in places.roots if root.local not in there]


def guess_layout(folder: Path) -> str:
    """The UI a folder belongs to, from what is in it (an install, or its models folder); plain when nothing
    says."""
    def has(*names: str) -> bool:
        return any((folder / name).exists() for name in names)

    if has("webui.py", "webui-user.sh", "webui-user.bat", "models/Stable-diffusion", "Stable-diffusion", "Lora"):
        return "a1111"
    if has("comfy", "models/checkpoints", "checkpoints", "loras", "diffusion_models"):
        return "comfyui"
    if has("invokeai.yaml"):
        return "invoke"
    return "plain"


def add_root(engine: Engine, path: str | os.PathLike, layout: str | None = None, kind: str | None = None,
             label: str | None = None, shared: bool = False, mounts: dict[str, str] | None = None) -> RootChange:
    """Add a folder of this host as a root (shared: one every host may mount; this host mounts it at `path`,
    others at `mounts`). The locations already known under it become its own."""
    folder = _folder(path)
    layout = layout or guess_layout(Path(folder))
    if layout not in LAYOUTS:
        raise AdapterzooError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    host = current_host()
    with Session(engine) as session, session.begin():
        if shared:
            root = session.scalar(select(Root).where(Root.host == SHARED_HOST, Root.path == folder))
            status = "already" if root is not None else "added"
            if root is None:
                _refuse_overlap(session, host, folder)
                root = Root(host=SHARED_HOST, path=folder, layout=layout, kind=kind, label=label, added=utcnow())
                session.add(root)
                session.flush()
            for mount_host, mount_path in {host: folder, **(mounts or {})}.items():
                _set_mount(session, root, mount_host, mount_path)
        else:
            root = session.scalar(select(Root).where(Root.host == host, Root.path == folder))
            status = "already" if root is not None else "added"
            if root is None:
                shared_here = [r for r in _shared_mounted(session, host) if is_under(folder, r.local_path(host))]
                if shared_here:
                    raise AdapterzooError(f"{folder} is inside shared root {shared_here[0].path} (mounted here at "
                                          f"{shared_here[0].local_path(host)}); its files are that root's")
                root = Root(host=host, path=folder, layout=layout, kind=kind, label=label, added=utcnow())
                session.add(root)
                session.flush()
        adopted = _adopt(session.connection(), root, host)
        return RootChange(_view(root, root.local_path(host) or root.path).to_json(), status, adopted)


def mount_root(engine: Engine, ref: str, path: str | os.PathLike, host: str | None = None) -> RootChange:
    """Say where `host` (default: this one) mounts a shared root; its locations there become the root's."""
    host = host or current_host()
    folder = _folder(path) if host == current_host() else os.path.normpath(str(path))
    with Session(engine) as session, session.begin():
        root = find_root(session, ref, host)
        if root.host != SHARED_HOST:
            raise AdapterzooError(f"root {root.id} ({root.path}) is {root.host}'s, not shared: only a shared root "
                                  f"is mounted (roots add --shared)")
        _set_mount(session, root, host, folder)
        adopted = _adopt(session.connection(), root, host)
        return RootChange(_view(root, folder).to_json(), "mounted", adopted)


def remove_root(engine: Engine, ref: str) -> RootChange:
    """This host's root stops being rescanned (its files stay in the registry, as known locations outside any
    root). A shared root loses this host's mount; with the last mount gone, its locations become this host's."""
    host = current_host()
    with Session(engine) as session, session.begin():
        root = find_root(session, ref, host)
        connection = session.connection()
        view = _view(root, root.local_path(host) or root.path).to_json()
        if root.host == SHARED_HOST:
            mount = next((m for m in root.mounts if m.host == host), None)
            if mount is None:
                raise AdapterzooError(f"shared root {root.path} is not mounted on {host}; nothing to remove here")
            others = [m for m in root.mounts if m.host != host]
            session.delete(mount)
            if others:
                return RootChange(view, "unmounted")
            moved = _unshare(connection, root, host, mount.path)
        else:
            moved = connection.execute(update(LOCATIONS).where(LOCATIONS.c.root_id == root.id)
                                       .values(root_id=None)).rowcount
        session.flush()
        session.delete(root)
        session.flush()
        for other in session.scalars(select(Root).where(Root.host == host)):
            _adopt(connection, other, host)
        return RootChange(view, "removed", moved)


def list_roots(engine: Engine, every_host: bool = False) -> list[dict[str, Any]]:
    """This host's roots and the shared ones (all hosts' with `every_host`), with what the registry holds in
    each: present locations and their bytes."""
    host = current_host()
    with Session(engine) as session:
        statement = select(Root).order_by(Root.id)
        if not every_host:
            statement = statement.where(Root.host.in_([host, SHARED_HOST]))
        roots = session.scalars(statement).all()
        counts = {row.root_id: (row.n, row.bytes) for row in session.execute(
            select(LOCATIONS.c.root_id, func.count().label("n"), func.sum(LOCATIONS.c.size).label("bytes"))
            .where(LOCATIONS.c.missing.is_(False), LOCATIONS.c.root_id.is_not(None))
            .group_by(LOCATIONS.c.root_id))}
        rows = []
        for root in roots:
            local = root.local_path(host)
            n, size = counts.get(root.id, (0, 0))
            rows.append({**_view(root, local or root.path).to_json(), "here": local is not None,
                         "exists": bool(local) and os.path.isdir(local), "files": n, "bytes": int(size or 0),
                         "mounts": {m.host: m.path for m in root.mounts} if root.host == SHARED_HOST else None})
    return rows


def _view(root: Root, local: str) -> RootView:
    return RootView(root.id, root.host, root.path, local, root.layout, root.kind, root.label)


def _folder(path: str | os.PathLike) -> str:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterzooError(f"{path}: no such folder")
    return str(folder.resolve())


def find_root(session: Session, ref: str, host: str) -> Root:
    """A root by id, or by its path on `host` (its mount, for a shared one) or its stored path."""
    roots = session.scalars(select(Root).where(Root.host.in_([host, SHARED_HOST])).order_by(Root.id)).all()
    wanted = {ref, os.path.normpath(os.path.abspath(os.path.expanduser(ref)))}
    if os.path.isdir(ref):
        wanted.add(str(Path(ref).resolve()))
    for root in roots:
        if (ref.isdigit() and root.id == int(ref)) or root.path in wanted or root.local_path(host) in wanted:
            return root
    raise AdapterzooError(f"no root {ref!r} on {host} (an id or a path: adapterzoo roots list)")


def _shared_mounted(session: Session, host: str) -> list[Root]:
    return [r for r in session.scalars(select(Root).where(Root.host == SHARED_HOST)) if r.local_path(host)]


def _refuse_overlap(session: Session, host: str, folder: str) -> None:
    """Shared roots never nest: a file under two would have two stored paths."""
    for other in _shared_mounted(session, host):
        local = other.local_path(host)
        if is_under(folder, local) or is_under(local, folder):
            raise AdapterzooError(f"{folder} overlaps shared root {other.path} (mounted here at {local})")


def _set_mount(session: Session, root: Root, host: str, path: str) -> None:
    mount = next((m for m in root.mounts if m.host == host), None)
    if mount is None:
        root.mounts.append(RootMount(root_id=root.id, host=host, path=path))
    else:
        mount.path = path
    session.flush()


def _adopt(connection: Connection, root: Root, host: str) -> int:
    """Locations under a root become its own, unless a deeper root holds them. Under a shared root, this
    host's locations become the root's (host '*', the root's path); where another host already recorded the
    same path there, that record stands. Returns how many locations changed."""
    local = root.local_path(host)
    if local is None:
        return 0
    changed = 0
    if root.host == SHARED_HOST:
        rows = connection.execute(select(LOCATIONS.c.id, LOCATIONS.c.path).where(
            LOCATIONS.c.host == host, under(LOCATIONS.c.path, local))).all()
        for row in rows:
            stored = translate(row.path, local, root.path)
            taken = connection.execute(select(LOCATIONS.c.id).where(LOCATIONS.c.host == SHARED_HOST,
                                                                    LOCATIONS.c.path == stored)).scalar()
            if taken is None:
                connection.execute(update(LOCATIONS).where(LOCATIONS.c.id == row.id)
                                   .values(host=SHARED_HOST, path=stored, name_key=name_key(stored), root_id=root.id))
            else:
                connection.execute(delete(LOCATIONS).where(LOCATIONS.c.id == row.id))
            changed += 1
    deeper = select(Root.id).where(Root.host == root.host, Root.id != root.id, under(Root.path, root.path))
    changed += connection.execute(update(LOCATIONS).where(
        LOCATIONS.c.host == root.host, under(LOCATIONS.c.path, root.path),
        or_(LOCATIONS.c.root_id.is_(None), and_(LOCATIONS.c.root_id != root.id, LOCATIONS.c.root_id.not_in(deeper))),
    ).values(root_id=root.id)).rowcount
    return changed


def _unshare(connection: Connection, root: Root, host: str, mount: str) -> int:
    """The last mount of a shared root goes: its locations become `host`'s, at their paths under its mount."""
    rows = connection.execute(select(LOCATIONS.c.id, LOCATIONS.c.path).where(LOCATIONS.c.root_id == root.id)).all()
    for row in rows:
        path = translate(row.path, root.path, mount)
        connection.execute(update(LOCATIONS).where(LOCATIONS.c.id == row.id).values(
            host=host, path=path, name_key=name_key(path), root_id=None))
    return len(rows)
