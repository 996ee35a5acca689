"""search, enrich, pull: Civitai and the Hugging Face Hub."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import describe_source, emit_json, print_table
from adapterzoo.formats.io.probe_result import KINDS
from adapterzoo.formats.model.registry import bases


@cli.command()
@click.argument("query")
@click.option("--source", type=click.Choice(["civitai", "hf", "all"]), default="all", show_default=True,
              help="Where to search (all: Civitai fills half the rows, the Hub the rest).")
@click.option("--kind", type=click.Choice([k for k in KINDS if k != "unknown"]), help="Only this kind.")
@click.option("--base", type=click.Choice(bases()), help="Only this base model.")
@click.option("--sort", type=click.Choice(["downloads", "rating", "newest"]), default="downloads",
              show_default=True, help="Order of the results.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="At most this many rows (one per model version).")
@click.option("--nsfw", is_flag=True, help="Include models marked NSFW.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def search(obj: dict[str, Any], query: str, source: str, kind: str | None, base: str | None, sort: str,
           limit: int, nsfw: bool, as_json: bool) -> None:
    """Search Civitai and the Hugging Face Hub: one row per model version, marked when already in the registry."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.search import search as run_search

    hits = run_search(open_registry(obj["db"]), query, source, kind, base, sort, limit, nsfw)
    if as_json:
        emit_json([hit.json for hit in hits])
        return
    rows = [{**hit.row(), "model": hit.json["model_id"], "version": hit.json["version_id"],
             "have": "yes" if hit.json["in_registry"] else ""} for hit in hits]
    print_table(rows, ["source", "model", "version", "name", "kind", "base", "file", "size", "downloads", "have"])


@cli.command()
@click.argument("refs", metavar="[ID|PATH|HASH]...", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every file in the registry that has no Civitai source yet.")
@click.option("--retry-missing", is_flag=True, help="Ask again about files Civitai did not know before.")
@click.option("--write-sidecars", is_flag=True,
              help="Also write <name>.civitai.info and <name>.preview.png beside each file found "
              "(never replacing one).")
@click.option("--token", metavar="T", help="Civitai API token (default: $CIVITAI_API_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per file.")
@click.pass_obj
def enrich(obj: dict[str, Any], refs: tuple[str, ...], every: bool, retry_missing: bool, write_sidecars: bool,
           token: str | None, as_json: bool) -> None:
    """Look registry files up on Civitai by SHA-256 and record model, version, base and trained words."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.enrich import enrich as run_enrich

    if not refs and not every:
        raise click.UsageError("say which files: ID|PATH|HASH..., or --all for every file without a source")
    outcomes = [o.to_json() for o in run_enrich(open_registry(obj["db"]), list(refs), every, retry_missing,
                                                  write_sidecars, token)]
    if as_json:
        emit_json(outcomes)
        return
    for outcome in outcomes:
        source = outcome["source"]
        said = describe_source({**source, "provider": "civitai"}) if source else outcome["reason"]
        click.echo(f"{outcome['status']:8} {outcome['id']:>4}  {outcome['name']}: {said}")
        for warning in outcome["warnings"]:
            click.echo(f"warning  {warning}")
        for path in outcome["sidecars"]:
            click.echo(f"wrote    {path}")
    counts = {s: sum(o["status"] == s for o in outcomes) for s in ("found", "unknown", "skipped")}
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()))


@cli.command()
@click.argument("refs", metavar="REF...", nargs=-1)
@click.option("--dest", metavar="DIR", type=click.Path(file_okay=False),
              help="Download into DIR (default: the current folder).")
@click.option("--library", metavar="DIR", type=click.Path(file_okay=False),
              help="An A1111 or ComfyUI folder: each file goes where that UI looks for its kind, with "
              "<name>.civitai.info and <name>.preview.png beside it.")
@click.option("--layout", type=click.Choice(["a1111", "comfyui"]), help="The --library's layout. Default: a1111.")
@click.option("--token", metavar="T", help="Civitai API token (default: $CIVITAI_API_TOKEN); the Hub reads HF_TOKEN.")
@click.option("--lock", "lock_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="Also pull every file a lock file (from `adapterzoo lock`) lists, skipping those already there.")
@click.option("--mirror", metavar="PATH|URL",
              help="Take --lock's files from this team mirror (a folder `lock --mirror` filled, or an http(s) server "
              "of it) before their sources; checked by SHA-256.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per REF.")
@click.pass_obj
def pull(obj: dict[str, Any], refs: tuple[str, ...], dest: str | None, library: str | None, layout: str | None,
         token: str | None, lock_file: str | None, mirror: str | None, as_json: bool) -> None:
    """Download REF... (civitai:VERSION_ID, civitai:model/MODEL_ID, a civitai.com model URL,
    hf:OWNER/REPO/PATH[@REV] or a URL), check it against the source's hashes, and register it with its source.
    Exit code 1 when any REF failed."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.mirror import Mirror
    from adapterzoo.zoo.pull import Target
    from adapterzoo.zoo.pull import pull as run_pull

    if dest and library:
        raise click.UsageError("give --dest or --library, not both")
    if layout and not library:
        raise click.UsageError("--layout goes with --library")
    if not refs and not lock_file:
        raise click.UsageError("say what to pull: REF..., or --lock FILE")
    if mirror and not lock_file:
        raise click.UsageError("--mirror goes with --lock: the mirror finds files by the lock's SHA-256s")
    target = Target(Path(dest or "."), Path(library) if library else None, layout or "a1111")
    outcomes = run_pull(open_registry(obj["db"]), list(refs), target, token, lock_file, progress_bar=not as_json,
                        mirror=Mirror.at(mirror) if mirror else None)
    if as_json:
        emit_json([o.to_json() for o in outcomes])
    for outcome in [] if as_json else outcomes:
        if outcome.error:
            click.echo(f"{'failed':13} {outcome.ref}: {outcome.error}")
            continue
        about = ", ".join(str(v) for v in (outcome.kind, outcome.base) if v)
        click.echo(f"{outcome.status:13} {outcome.ref}  {outcome.path}  ({about}; AutoV2 {outcome.autov2})")
        for note in outcome.notes:
            click.echo(f"{'':13} {note}")
        for path in outcome.sidecars:
            click.echo(f"{'wrote':13} {path}")
    if any(o.status == "failed" for o in outcomes):
        sys.exit(1)
