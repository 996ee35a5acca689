"""prune, rm, dupes, dedupe, du, organize: looking after the library on disk, without ever losing a file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import emit_json, print_table
from adapterzoo.sizes import human_size


@cli.command()
@click.option("--older-than", "days", type=click.FloatRange(min=0), default=30, show_default=True, metavar="DAYS",
              help="Forget what has been missing (or, for a file, seen nowhere) for more than DAYS days.")
@click.option("--yes", is_flag=True, help="Forget without asking (without it, only the list is printed unless a "
              "terminal can be asked).")
@click.option("--json", "as_json", is_flag=True, help="Print what is (or, with --yes, was) forgotten as JSON.")
@click.pass_obj
def prune(obj: dict[str, Any], days: float, yes: bool, as_json: bool) -> None:
    """Forget locations missing from this host for more than DAYS days, and files no location holds any more
    (with their sources and verifications). Lists them first; nothing on disk is touched."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.prune import prunable
    from adapterzoo.zoo.prune import prune as run_prune

    engine = open_registry(obj["db"])
    found = prunable(engine, days)
    if not as_json:
        for loc in found.locations:
            click.echo(f"missing since {loc['missing_since'][:19]}  {loc['path']}  (file {loc['id']})")
        for entry in found.files:
            where = entry["paths"][0] if entry["paths"] else entry["sha256"]
            click.echo(f"file {entry['id']} ({entry['kind']}, {human_size(entry['size'])}) seen nowhere since "
                       f"{entry['last_seen'][:19]}: {where}")
    count = f"{len(found.locations)} locations and {len(found.files)} files"
    empty = not found.locations and not found.files
    if not (yes or empty or as_json) and sys.stdin.isatty():
        yes = click.confirm(f"forget these {count}?")
    if empty or not yes:
        if as_json:
            emit_json({"forgotten": False, **found.to_json()})
        else:
            click.echo("nothing to forget" if empty else f"{count} would be forgotten: run again with --yes")
        return
    done = run_prune(engine, found)
    if as_json:
        emit_json({"forgotten": True, **done.to_json()})
        return
    click.echo(f"forgot {len(done.locations)} locations and {len(done.files)} files")


@cli.command()
@click.argument("refs", metavar="ID|PATH|NAME|HASH...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per copy.")
@click.pass_obj
def rm(obj: dict[str, Any], refs: tuple[str, ...], as_json: bool) -> None:
    """Move files to the trash (Trash / Recycle Bin, where they can be restored), with their sidecars
    (.civitai.info, .json, previews, ...). A PATH is that copy; an id, name or hash is every copy of the file
    on this host. Nothing is unlinked; exit code 1 if any copy could not be moved."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.trash import trash

    outcomes = trash(open_registry(obj["db"]), list(refs))
    if as_json:
        emit_json([o.to_json() for o in outcomes])
    for outcome in [] if as_json else outcomes:
        click.echo(f"{outcome.status:8} {outcome.path}" + (f": {outcome.error}" if outcome.error else ""))
        for sidecar in outcome.sidecars:
            click.echo(f"{'':8} {sidecar}")
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)


@cli.command()
@click.option("--by", type=click.Choice(["sha256", "tensors", "name"]), default="sha256", show_default=True,
              help="sha256: the same bytes. tensors: the same tensors, other metadata (AutoV3: a re-saved or "
              "re-tagged copy). name: the same file name, other content.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per group.")
@click.pass_obj
def dupes(obj: dict[str, Any], by: str, as_json: bool) -> None:
    """Groups of copies on this host that are one file (or look like one), with which root (which UI's folder)
    each is in, its size, which is newest, which have a source and a pass verdict, and the bytes a dedupe
    would free."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.dupes import find_dupes

    groups = [g.to_json() for g in find_dupes(open_registry(obj["db"]), by)]
    if as_json:
        emit_json(groups)
        return
    for group in groups:
        freed = "" if group["bytes_freed"] is None else f", {human_size(group['bytes_freed'])} to free"
        click.echo(f"{by} {group['key'][:16]}: {len(group['copies'])} copies{freed}")
        for copy in group["copies"]:
            marks = [word for word, on in (("newest", copy["path"] == group["newest"]), ("source", copy["sources"]),
                                           ("pass", copy["verdict"] == "pass"), ("linked", copy["linked"])) if on]
            root = copy["root"]
            ui = f"{root['layout']}{' ' + root['kind'] if root['kind'] else ''}" if root else "no root"
            click.echo(f"  {human_size(copy['size']):>9}  {ui:16} {','.join(marks):22} {copy['path']}")
    total = sum(g["bytes_freed"] or 0 for g in groups)
    click.echo(f"{len(groups)} groups" + ("" if by == "name" else f", {human_size(total)} to free"))


@cli.command()
@click.option("--link", type=click.Choice(["hard", "sym"]), default="hard", show_default=True,
              help="hard: one file with several names (same file system only); sym: symbolic links to the kept "
              "copy.")
@click.option("--keep", type=click.Choice(["newest", "oldest", "first-root"]), default="newest", show_default=True,
              help="Which copy the others become links to (first-root: the one in the root added first).")
@click.option("--dry-run", is_flag=True, help="Say what would be linked and the bytes freed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per copy.")
@click.pass_obj
def dedupe(obj: dict[str, Any], link: str, keep: str, dry_run: bool, as_json: bool) -> None:
    """Replace identical copies on this host (`dupes`) by links to one of them. Each copy is compared byte by
    byte with the kept one right before, and replaced atomically: it is either untouched or a link."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.dedupe import dedupe as run_dedupe

    outcomes = [o.to_json() for o in run_dedupe(open_registry(obj["db"]), keep, link, dry_run)]
    if as_json:
        emit_json(outcomes)
    else:
        for outcome in outcomes:
            why = f" ({outcome['reason']})" if outcome["reason"] else ""
            click.echo(f"{outcome['status']:10} {outcome['path']} -> {outcome['kept']}{why}")
        done = [o for o in outcomes if o["status"] in ("linked", "would link")]
        verb = "would free" if dry_run else "freed"
        click.echo(f"{len(done)} copies {'to link' if dry_run else 'linked'}, {verb} "
                   f"{human_size(sum(o['bytes_freed'] for o in done))}")
    if any(o["status"] == "failed" for o in outcomes):
        sys.exit(1)


@cli.command()
@click.option("--by", type=click.Choice(["kind", "base", "root", "source"]), default="kind", show_default=True,
              help="Group by kind, base model, root (which UI's folder), or source (civitai, hf, url, none).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per group.")
@click.pass_obj
def du(obj: dict[str, Any], by: str, as_json: bool) -> None:
    """Disk use of this host's copies: bytes on disk (hard links once), files and copies per group."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.dupes import disk_use

    rows = disk_use(open_registry(obj["db"]), by)
    if as_json:
        emit_json(rows)
        return
    total = {"group": "total", "files": sum(r["files"] for r in rows), "copies": sum(r["copies"] for r in rows),
             "bytes": sum(r["bytes"] for r in rows)}
    print_table([{by: r["group"], "size": human_size(r["bytes"]), "files": r["files"], "copies": r["copies"]}
                 for r in [*rows, total]], [by, "size", "files", "copies"], wide={by})


@cli.command()
@click.option("--template", required=True, metavar="T",
              help="The path of each file inside its UI folder, from {base}, {kind}, {format}, {model_name}, "
              "{version_name}, {creator}, {trigger} (the first trigger word), {file_name}, {autov2}; "
              "{file_name} is added at the end if missing. E.g. \"{base}/{model_name}/{file_name}\".")
@click.option("--root", metavar="ID|PATH", help="Only the files of this root (default: every root of this host).")
@click.option("--link", is_flag=True, help="Hard-link each file (and its sidecars) at its new path instead of "
              "moving it.")
@click.option("--dry-run", is_flag=True, help="Say where each file would go; move nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per file.")
@click.pass_obj
def organize(obj: dict[str, Any], template: str, root: str | None, link: bool, dry_run: bool, as_json: bool) -> None:
    """Move (or link) the files of your roots, with their sidecars, into folders named after registry fields,
    inside the UI folder each is in. Never over another file (a taken name gets the AutoV2 suffix); the
    registry follows every move; an interrupted run is finished by the next one. Exit code 1 if any failed."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.organize import organize as run_organize

    steps = [s.to_json() for s in run_organize(open_registry(obj["db"]), template, root, dry_run, link)]
    if as_json:
        emit_json(steps)
    else:
        for step in steps:
            if step["status"] == "in place":
                continue
            where = f" -> {step['to']}" if step["to"] else ""
            why = f" ({step['reason']})" if step["reason"] else ""
            click.echo(f"{step['status']:10} {step['path']}{where}{why}")
            for sidecar in step["sidecars"]:
                click.echo(f"{'':10} + {Path(sidecar).name}")
            for note in step["notes"]:
                click.echo(f"{'':10} {note}")
        counts: dict[str, int] = {}
        for step in steps:
            counts[step["status"]] = counts.get(step["status"], 0) + 1
        click.echo(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing to organize")
    if any(s["status"] == "failed" for s in steps):
        sys.exit(1)
