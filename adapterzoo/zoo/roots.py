"""Roots: the folders a bare `scan` rescans, each a UI's install or model folder; shared ones per-host mounted."""

from __future__ import annotations

import os

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from adapterzoo.zoo.hosts import SHARED_HOST, Places, RootView, current_host
from adapterzoo.zoo.models import Root


def load_places(engine: Engine, host: str) -> Places:
    """The roots `host` can reach: its own, and the shared ones it mounts."""
    with Session(engine) as session:
        roots = session.scalars(select(Root).where(Root.host.in_([host, SHARED_HOST])).order_by(Root.id)).all()
        views = [RootView(r.id, r.host, r.path, local, r.layout, r.kind, r.label)
                 for r in roots if (local := r.local_path(host)) is not None]
    return Places(host, views)


def roots_to_scan(engine: Engine) -> tuple[list[str], list[str]]:
    """(the roots this host reaches that are there, those that are not): a bare `scan` walks the first and
    leaves what it knows under the others alone (a drive unplugged is not a library deleted)."""
    places = load_places(engine, current_host())
    there = [root.local for root in places.roots if os.path.isdir(root.local)]
    return there, [root.local for root in places.roots if root.local not in there]
