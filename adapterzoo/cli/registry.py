"""scan, list, show, lock: the registry of what is on disk, on every host."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import describe_event, describe_location, describe_source, emit_json, print_table
from adapterzoo.formats.io.probe_result import KINDS
from adapterzoo.formats.model.registry import bases, detail_values
from adapterzoo.sizes import human_size


@cli.command()
@click.argument("dirs", nargs=-1, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the counts and every entry found as JSON.")
@click.pass_obj
def scan(obj: dict[str, Any], dirs: tuple[str, ...], as_json: bool) -> None:
    """Index model files and folders under DIR... (default: every root, `adapterzoo roots list`) into the
    registry, as this host's (ADAPTERZOO_HOST). Only new or changed files are read; moved ones are followed."""
    from adapterzoo.views import scan_result
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.roots import roots_to_scan
    from adapterzoo.zoo.scan import scan_paths

    engine = open_registry(obj["db"])
    absent: list[str] = []
    if not dirs:
        dirs, absent = roots_to_scan(engine)
        if not dirs and not absent:
            raise click.UsageError("say what to scan: DIR..., or add roots first (adapterzoo roots add DIR)")
    report = scan_paths(dirs, engine, progress_bar=not as_json) if dirs else None
    if as_json:
        emit_json(scan_result(engine, report, absent))
        return
    for root in absent:
        click.echo(f"not found: {root}: root skipped (unplugged?); nothing under it is marked missing")
    if report is None:
        return
    for move in report.moves:
        click.echo(f"{move['action'] + 'd':9} {move['from']} -> {move['to']}")
    for problem in report.problems:
        click.echo(f"{problem['status']}: {problem['path']}: {problem['error']}")
    click.echo(report.summary())


LIST_COLUMNS = ("id", "kind", "base", "format", "rank", "autov2", "status", "verified", "name", "size", "path",
                "triggers", "copies", "hosts", "sha256")
DEFAULT_COLUMNS = "id,kind,base,format,rank,autov2,status,verified,name"


@cli.command("list")
@click.option("--kind", type=click.Choice(KINDS), help="Only entries of this kind.")
@click.option("--base", type=click.Choice([*bases(), "unknown"]), help="Only entries for this base model.")
@click.option("--family", type=click.Choice(detail_values("family")),
              help="Only files of this family of their base: what the file's own metadata names, else its Civitai "
              "source's label.")
@click.option("--query", metavar="TEXT",
              help="Only entries whose path, trigger words, or source's model name, version name or trained "
              "words contain TEXT.")
@click.option("--verdict", type=click.Choice(["pass", "fail", "never"]),
              help="Only entries whose latest verification passed / failed, or that were never verified.")
@click.option("--host", metavar="H", help="Only entries with a location on host H (as ADAPTERZOO_HOST names it); "
              "paths and status as H sees them.")
@click.option("--here", is_flag=True, help="Only entries with a location on this host.")
@click.option("--columns", metavar="A,B,...", default=DEFAULT_COLUMNS, show_default=True,
              help=f"Table columns, of: {', '.join(LIST_COLUMNS)}.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def list_(obj: dict[str, Any], kind: str | None, base: str | None, query: str | None, verdict: str | None,
          family: str | None, host: str | None, here: bool, columns: str, as_json: bool) -> None:
    """List registry entries: one row per file (content), wherever its copies are."""
    from adapterzoo.views import file_rows
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.hosts import current_host
    from adapterzoo.zoo.queries import list_entries

    wanted = [c.strip().lower() for c in columns.split(",") if c.strip()]
    if unknown := [c for c in wanted if c not in LIST_COLUMNS]:
        raise click.UsageError(f"no column {', '.join(unknown)}; choose from {', '.join(LIST_COLUMNS)}")
    if host and here:
        raise click.UsageError("give --host H or --here, not both")
    host = current_host() if here else host
    engine = open_registry(obj["db"])
    rows = file_rows(engine, list_entries(engine, kind=kind, base=base, query=query, verdict=verdict,
                                          family=family, host=host), host)
    if as_json:
        emit_json(rows)
        return
    print_table([table_row(r) for r in rows], wanted, wide={"path", "triggers"})


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A `list` JSON object as table cells."""
    present = [loc for loc in row["locations"] if not loc["missing"]]
    verified = f"{row['verified']} (quick)" if row["verified_quick"] else row["verified"]
    return {**row, "verified": verified or "-", "size": human_size(row["size"]),
            "triggers": ", ".join(row["trigger_words"]), "copies": len(present),
            "hosts": ",".join(sorted({loc["host"] for loc in present}))}


@cli.command()
@click.argument("ref", metavar="ID|PATH|NAME|HASH")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def show(obj: dict[str, Any], ref: str, as_json: bool) -> None:
    """Show one registry entry, found by id, path, file name, any of its hashes, or a sha256 prefix (8+ hex),
    with every location it has on every host."""
    from adapterzoo.views import file_detail
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.queries import find_entry

    engine = open_registry(obj["db"])
    entry = file_detail(engine, find_entry(engine, ref))
    if as_json:
        emit_json(entry)
        return
    verification = entry.pop("verification")
    for key in ("verifications", "training_tags", "provenance"):  # --json shows them; the table stays short
        entry.pop(key)
    for key, value in entry.items():
        if key == "metadata":
            value = f"{len(value)} keys (--json shows them)" if value else None
        elif key == "size":
            value = f"{human_size(value)} ({value} bytes)"
        elif key == "sources":
            for source in value:
                click.echo(f"{'source':14} {describe_source(source)}")
            continue
        elif key == "locations":
            for location in value:
                click.echo(f"{'location':14} {describe_location(location)}")
            continue
        elif key == "history":
            for event in value:
                click.echo(f"{'history':14} {describe_event(event)}")
            continue
        elif key == "source_warnings":
            for warning in value:
                click.echo(f"{'warning':14} {warning}")
            continue
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = json.dumps(value, default=str)
        click.echo(f"{key:14} {'-' if value in (None, '') else value}")
    if verification is None:
        click.echo(f"{'verified':14} never")
        return
    quick = " (quick: noise predictions only, no grid)" if verification["quick"] else ""
    click.echo(f"{'verified':14} {verification['verdict']}{quick} on {verification['checkpoint']} "
               f"({verification['created']})")
    for reason in verification["reasons"]:
        click.echo(f"{'':14} - {reason}")
    click.echo(f"{'grid':14} {verification['grid'] or '-'}")


@cli.command()
@click.option("-o", "--output", "dest", metavar="FILE", required=True, type=click.Path(dir_okay=False),
              help="The lock file to write (JSON).")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
@click.option("--mirror", metavar="DIR", type=click.Path(file_okay=False),
              help="Also put every file the lock names into the team mirror DIR (sha256/ab/<sha256>), hard-linked "
              "where the filesystem allows, else copied; `pull --lock FILE --mirror DIR|URL` takes them from there.")
@click.option("--json", "as_json", is_flag=True, help="Also print what was written.")
@click.pass_obj
def lock(obj: dict[str, Any], dest: str, force: bool, mirror: str | None, as_json: bool) -> None:
    """Write every registry file that has a source (REF, name, kind, base, size, SHA-256) to a lock file.
    Exit code 1 when a file could not go into the --mirror."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.lock import write_lock
    from adapterzoo.zoo.mirror import mirror_folder, stock

    engine = open_registry(obj["db"])
    root = mirror_folder(Path(mirror)) if mirror else None
    body = write_lock(engine, dest, force)
    stocked = stock(engine, root, body["files"]) if root else []
    if as_json:
        emit_json({**body, "mirror": [s.to_json() for s in stocked]} if mirror else body)
    else:
        click.echo(f"wrote    {dest} ({len(body['files'])} files)")
    if mirror and not as_json:
        for item in stocked:
            if item.reason:
                click.echo(f"{item.status:8} {item.file_name}: {item.reason}")
        added = [s for s in stocked if s.status == "added"]
        click.echo(f"mirror   {mirror}: {len(added)} added ({sum(s.linked for s in added)} hard-linked), "
                   f"{sum(s.status == 'present' for s in stocked)} already there")
    if any(s.reason for s in stocked):
        sys.exit(1)
