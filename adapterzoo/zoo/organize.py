"""`organize`: move (or hard-link) files and their sidecars to a path made from a template over registry
fields, inside the UI folder they are in (a LoRA in A1111's models/Lora stays under models/Lora).

Never over another file: a taken name gets the AutoV2 suffix, as pull does. The registry follows each move.
Every step is journaled first: the whole plan is written to the events table as `planned` before the first
file moves, each step is marked `done` with its registry update, and a run starts by finishing the steps an
interrupted run left. A file is at its old path or its new one (for an instant, at both, as hard links),
never lost.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.download import beside_name
from adapterzoo.zoo.events import record_event, utcnow
from adapterzoo.zoo.file_moves import move_new
from adapterzoo.zoo.file_names import safe_file_name
from adapterzoo.zoo.hosts import Places, RootView, current_host, is_under
from adapterzoo.zoo.library import LAYOUTS
from adapterzoo.zoo.models import Event, FileEntry, Location, Source, name_key
from adapterzoo.zoo.roots import find_root, load_places
from adapterzoo.zoo.scan import Seen, upsert_location
from adapterzoo.zoo.sidecars import sidecar_files
from adapterzoo.zoo.triggers import find_preview, sidecar_stem
from adapterzoo.zoo.walk import find_entries

FIELDS = ("base", "kind", "format", "model_name", "version_name", "creator", "trigger", "file_name", "autov2")
EVENTS = Event.__table__
LOCATIONS = Location.__table__


@dataclass
class Step:
    """One file's move (or link) with its sidecars: planned, carried out, or why not."""

    file_id: int
    location_id: int
    path: str
    moves: list[list[str]] = field(default_factory=list)  # [from, to], the model first, then its sidecars
    link: bool = False
    status: str = "planned"  # would move | would link | moved | linked | in place | skipped | failed
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    journal: int | None = None  # the event that journals it

    @property
    def target(self) -> str | None:
        return self.moves[0][1] if self.moves else None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.file_id, "path": self.path, "to": self.target, "status": self.status,
                "reason": self.reason, "sidecars": [to for _, to in self.moves[1:]], "notes": self.notes}


def template_fields(template: str) -> list[str]:
    """The fields `template` uses; an unknown field, or anything but a plain {field}, is refused."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise AdapterzooError(f"template {template!r}: {exc}") from None
    used = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in FIELDS or spec or conversion:
            raise AdapterzooError(f"template {template!r}: {{{name}}} is not a field; use {{{'}, {'.join(FIELDS)}}}")
        used.append(name)
    if template.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", template):
        raise AdapterzooError(f"template {template!r} must be relative: it is placed inside each file's UI folder")
    return used


def organize(engine: Engine, template: str, root: str | None = None, dry_run: bool = False,
             link: bool = False) -> list[Step]:
    """Finish what an interrupted run left, then plan every file of `root` (default: every root this host
    reaches), journal the plan, and carry it out step by step. `dry_run`: only the plan."""
    used = template_fields(template)
    places = load_places(engine, current_host())
    finished = [] if dry_run else finish_pending(engine, places)
    roots = [_chosen_root(engine, places, root)] if root else [r for r in places.roots if r.layout != "invoke"]
    steps = _plan(engine, places, roots, template, used, link)
    if dry_run:
        return finished + steps
    todo = [step for step in steps if step.status.startswith("would ")]
    _journal(engine, places.host, todo)
    for step in todo:
        _carry_out(engine, places, step)
    return finished + steps


def finish_pending(engine: Engine, places: Places) -> list[Step]:
    """Carry out the organize steps this host journaled and did not finish (a run that was interrupted)."""
    with engine.connect() as connection:
        rows = connection.execute(select(EVENTS).where(EVENTS.c.action == "organize", EVENTS.c.state == "planned",
                                                       EVENTS.c.host == places.host).order_by(EVENTS.c.id)).all()
    steps = []
    for row in rows:
        detail = row.detail
        step = Step(row.file_id, detail["location_id"], detail["moves"][0][0], detail["moves"], detail["link"],
                    "resumed", journal=row.id)
        _carry_out(engine, places, step)
        step.notes.insert(0, "finished what an interrupted run had begun")
        steps.append(step)
    return steps


def _chosen_root(engine: Engine, places: Places, ref: str) -> RootView:
    with Session(engine) as session:
        root = places.root(find_root(session, ref, places.host).id)
    if root is None:
        raise AdapterzooError(f"root {ref!r} is not reachable from {places.host}")
    if root.layout == "invoke":
        raise AdapterzooError(f"{root.local} is an InvokeAI models folder: InvokeAI keeps its own record of where "
                              f"each model is, so adapterzoo does not move its files")
    return root


def _plan(engine: Engine, places: Places, roots: list[RootView], template: str, used: list[str],
          link: bool) -> list[Step]:
    by_id = {root.id: root for root in roots}
    with Session(engine) as session:
        entries = session.scalars(select(FileEntry).where(FileEntry.id.in_(
            select(Location.file_id).where(Location.root_id.in_(by_id), Location.missing.is_(False))))).all()
        sources: dict[int, Source] = {}
        for source in session.scalars(select(Source).where(Source.file_id.in_([e.id for e in entries]))
                                      .order_by(Source.created, Source.id)):
            sources[source.file_id] = source  # the newest wins
    steps: list[Step] = []
    claimed: set[str] = set()
    located = [(entry, loc, local) for entry in entries for loc in entry.locations
               if loc.root_id in by_id and not loc.missing and (local := places.local(loc.host, loc.path, loc.root_id))]
    for entry, loc, local in sorted(located, key=lambda item: item[2]):
        step = Step(entry.id, loc.id, local, link=link)
        _place(step, entry, sources.get(entry.id), by_id[loc.root_id], template, used, claimed)
        steps.append(step)
    return steps


def _place(step: Step, entry: FileEntry, source: Source | None, root: RootView, template: str, used: list[str],
           claimed: set[str]) -> None:
    """Fill `step` with where the file goes, or say why it stays."""
    local = Path(step.path)
    base = _ui_folder(root, step.path)
    if base is None:
        step.status, step.reason = "skipped", f"not in one of {root.layout}'s model folders under {root.local}"
        return
    values = _values(entry, source, local)
    if missing := [name for name in used if values.get(name) is None]:
        step.status = "skipped"
        step.reason = f"no {', '.join(missing)}" + (" (pull or enrich it first)" if set(missing) & {
            "model_name", "version_name", "creator"} else "")
        return
    relative = template.format(**values)
    if "{file_name}" not in template:
        relative += "/" + values["file_name"]
    target = base.joinpath(*[part for part in re.split(r"[\\/]+", relative) if part])
    if target == local:
        step.status = "in place"
        return
    if step.link and entry.is_folder:
        step.status, step.reason = "skipped", "a folder cannot be hard-linked"
        return
    if os.path.lexists(target) or str(target) in claimed:
        if os.path.lexists(target) and os.path.samefile(target, local):
            step.status = "in place"
            return
        if entry.sha256 is None or entry.is_folder:
            step.status, step.reason = "skipped", f"{target} is taken"
            return
        target = beside_name(target, entry.sha256)
        if os.path.lexists(target) or str(target) in claimed:
            step.status, step.reason = "skipped", f"{target.name} and the name it would take are both taken"
            return
        step.notes.append("its name was taken: it gets the AutoV2 suffix")
    claimed.add(str(target))
    step.moves = [[step.path, str(target)]]
    stem, new_stem = sidecar_stem(local, entry.is_folder), sidecar_stem(target, entry.is_folder)
    for sidecar in sidecar_files(local, entry.is_folder):
        destination = new_stem.with_name(new_stem.name + sidecar.name[len(stem.name):])
        if os.path.lexists(destination) or str(destination) in claimed:
            step.notes.append(f"{sidecar.name} stays: {destination} exists")
            continue
        claimed.add(str(destination))
        step.moves.append([str(sidecar), str(destination)])
    step.status = "would link" if step.link else "would move"


def _ui_folder(root: RootView, path: str) -> Path | None:
    """The folder a file is organized within: its UI's folder for its kind when the root is a whole install
    (A1111's models/Lora, ComfyUI's models/loras), else the root. None: a whole install's file outside every
    model folder (an extension's, say), which is left alone."""
    if root.kind is not None or root.layout not in LAYOUTS:
        return Path(root.local)
    folders = {Path(root.local) / f for f in LAYOUTS[root.layout].values()}
    folders |= {Path(root.local) / Path(f).relative_to("models") for f in LAYOUTS[root.layout].values()
                if f.startswith("models/")}
    inside = [f for f in folders if is_under(path, str(f)) and path != str(f)]
    return max(inside, key=lambda f: len(f.parts)) if inside else None


def _values(entry: FileEntry, source: Source | None, path: Path) -> dict[str, str | None]:
    """The template's fields for one file, each made one safe path component (None when it has none)."""
    raw = {"base": entry.base, "kind": entry.kind, "format": entry.format or "unknown",
           "model_name": source.model_name if source else None,
           "version_name": source.version_name if source else None,
           "creator": source.creator if source else None,
           "trigger": entry.trigger_words[0] if entry.trigger_words else None,
           "autov2": entry.autov2}
    values = {name: safe_file_name(str(value)) if value is not None else None for name, value in raw.items()}
    return {**values, "file_name": path.name}


def _journal(engine: Engine, host: str, steps: list[Step]) -> None:
    """Write every step as a planned event, in one transaction, before any file moves."""
    with engine.begin() as connection:
        for step in steps:
            step.journal = record_event(connection, host, "organize", step.file_id, step.path, step.target,
                                        {"moves": step.moves, "link": step.link, "location_id": step.location_id},
                                        state="planned")


def _carry_out(engine: Engine, places: Places, step: Step) -> None:
    """Move (or link) the model, then its sidecars, then record it: the location follows, the step is done."""
    for index, (source, target) in enumerate(step.moves):
        done, why = _apply(Path(source), Path(target), step.link)
        if done:
            continue
        if index == 0:
            step.status, step.reason = "failed", why
            _finish(engine, step, "failed")
            return
        step.notes.append(f"{Path(source).name} stays: {why}")
    target = Path(step.target)
    found = next(find_entries(target))
    seen = Seen(found, *places.stored(str(target)))
    preview = find_preview(sidecar_stem(target, found.is_folder), found.neighbours)
    with engine.begin() as connection:
        if step.link:
            upsert_location(connection, seen, preview, step.file_id, utcnow())
        else:
            try:
                with connection.begin_nested():
                    connection.execute(update(LOCATIONS).where(LOCATIONS.c.id == step.location_id).values(
                        host=seen.host, path=seen.path, name_key=name_key(seen.path), root_id=seen.root_id,
                        inode=found.inode, device=found.device, mtime_ns=found.mtime_ns, preview_path=preview,
                        missing=False, missing_since=None))
            except IntegrityError:  # a scan meanwhile recorded the new path: the old record goes
                connection.execute(delete(LOCATIONS).where(LOCATIONS.c.id == step.location_id))
        _set_state(connection, step, "done")
    step.status = "linked" if step.link else "moved"


def _apply(source: Path, target: Path, link: bool) -> tuple[bool, str | None]:
    """One move or link, idempotent: what an earlier, interrupted run did counts as done."""
    there, arrived = os.path.lexists(source), os.path.lexists(target)
    try:
        if link:
            if arrived:
                return (True, None) if not there or os.path.samefile(source, target) else (False, f"{target} exists")
            if not there:
                return False, f"{source} is gone"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, target)
            return True, None
        if there and arrived:
            if not source.is_dir() and os.path.samefile(source, target):  # cut short between link and unlink
                source.unlink()
                return True, None
            return False, f"{target} exists"
        if arrived:
            return True, None
        if not there:
            return False, f"neither {source} nor {target} exists"
        target.parent.mkdir(parents=True, exist_ok=True)
        return (True, None) if move_new(source, target) else (False, f"{target} appeared meanwhile")
    except (OSError, AdapterzooError) as exc:
        return False, str(exc) if isinstance(exc, AdapterzooError) else f"{exc.strerror or exc}: {exc.filename}"


def _finish(engine: Engine, step: Step, state: str) -> None:
    with engine.begin() as connection:
        _set_state(connection, step, state)


def _set_state(connection: Any, step: Step, state: str) -> None:
    if step.journal is None:
        return
    detail = {"moves": step.moves, "link": step.link, "location_id": step.location_id, "notes": step.notes,
              "reason": step.reason}
    connection.execute(update(EVENTS).where(EVENTS.c.id == step.journal).values(state=state, detail=detail))
