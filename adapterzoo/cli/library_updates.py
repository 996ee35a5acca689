"""updates, updates ignore, updates unignore: newer versions on Civitai of what the registry holds."""

from __future__ import annotations

from typing import Any

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import emit_json, print_table
from adapterzoo.sizes import human_size


@cli.group(invoke_without_command=True)
@click.option("--same-base", is_flag=True,
              help="Only versions for the same base as yours, in adapterzoo's words (several Civitai labels "
              "map to one base).")
@click.option("--include-early-access", is_flag=True,
              help="Also versions still in early access (downloadable only by paying supporters for now).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per model.")
@click.pass_context
def updates(ctx: click.Context, same_base: bool, include_early_access: bool, as_json: bool) -> None:
    """Newer versions on Civitai of every model the registry holds a file of (pulled or enriched); a version
    you have anywhere (by SHA-256) is not an update. Prints the `adapterzoo pull` command for each."""
    if ctx.invoked_subcommand is not None:
        return
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.updates import find_updates

    results = find_updates(open_registry(ctx.obj["db"]), same_base, include_early_access)
    if as_json:
        emit_json([r.to_json() for r in results])
        return
    if not results:
        click.echo("no file in the registry has a Civitai source: `adapterzoo enrich --all` finds them")
        return
    rows = [{"model": f"{r.model_name} ({r.model_id})",
             "yours": f"{r.yours['version_name']} ({r.yours['version_id']})",
             "newer": f"{o.version_name} ({o.version_id})", "base": o.base_stated or o.base,
             "date": (o.published or "")[:10] or "-", "size": human_size(o.size),
             "note": f"early access until {(o.early_access_ends or '?')[:10]}" if o.early_access else "",
             "get": f"adapterzoo pull civitai:{o.version_id}"}
            for r in results for o in r.newer]
    if rows:
        print_table(rows, ["model", "yours", "newer", "base", "date", "size", "get"]
                    + (["note"] if include_early_access else []))
    counts = {s: sum(r.status == s for r in results) for s in ("update", "up to date", "not found", "ignored")}
    click.echo(f"{len(results)} models: {counts['update']} with updates, {counts['up to date']} up to date"
               + (f", {counts['not found']} no longer on Civitai" if counts["not found"] else "")
               + (f", {counts['ignored']} ignored" if counts["ignored"] else ""))


@updates.command()
@click.argument("refs", metavar="[civitai:VERSION_ID | civitai:model/MODEL_ID]...", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print the ignore list as JSON.")
@click.pass_obj
def ignore(obj: dict[str, Any], refs: tuple[str, ...], as_json: bool) -> None:
    """Stop offering a version (VERSION_ID) or a whole model (model/MODEL_ID); without one, show the list."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.ignored_updates import ignore as add
    from adapterzoo.zoo.ignored_updates import ignored, looks_like_a_model, parse_target

    engine = open_registry(obj["db"])
    targets = [parse_target(ref) for ref in refs]
    for target, new in add(engine, targets):
        if not as_json:
            click.echo(f"{'ignored' if new else 'already ignored':16} {target.ref}")
        if (name := looks_like_a_model(engine, target)) is not None:
            click.echo(f"note: {target.remote_id} is the id of the model {name}, not of one of its versions; "
                       f"`updates ignore model/{target.remote_id}` ignores the model", err=True)
    if as_json:
        emit_json([{"target": i.target, "id": i.remote_id, "ref": i.ref} for i in ignored(engine)])
    elif not targets:
        for item in ignored(engine):
            click.echo(f"{'ignored':16} {item.ref}")


@updates.command()
@click.argument("refs", metavar="civitai:VERSION_ID | civitai:model/MODEL_ID...", nargs=-1, required=True)
@click.pass_obj
def unignore(obj: dict[str, Any], refs: tuple[str, ...]) -> None:
    """Offer these versions or models again."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.ignored_updates import parse_target
    from adapterzoo.zoo.ignored_updates import unignore as remove

    targets = [parse_target(ref) for ref in refs]
    remove(open_registry(obj["db"]), targets)
    for target in targets:
        click.echo(f"{'offered again':16} {target.ref}")
