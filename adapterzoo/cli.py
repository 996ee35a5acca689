"""The adapterzoo command line: parse, call one room, print a table or --json. No logic here."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from adapterzoo import __version__
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.probe_result import BASES, KINDS


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Plain aligned columns; long values are cut so a row stays on one line."""
    if not rows:
        click.echo("(nothing)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c)))[:60] for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


@click.group()
@click.version_option(__version__, prog_name="adapterzoo")
@click.option(
    "--db",
    metavar="URL",
    help="Registry: an SQLAlchemy URL or an SQLite file (default: $ADAPTERZOO_DB, else registry.db "
    "in $ADAPTERZOO_HOME or the user data folder).",
)
@click.pass_context
def cli(ctx: click.Context, db: str | None) -> None:
    """Index, read, convert, merge and verify Stable Diffusion checkpoints and adapters."""
    ctx.obj = {"db": db}


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def probe(path: str, as_json: bool) -> None:
    """Say what FILE (or diffusers/PEFT folder) is: kind, base, format, rank, alpha, dtype."""
    from adapterzoo.formats.probe import probe as probe_path

    result = probe_path(path).to_json()
    if as_json:
        emit_json(result)
        return
    for key in ("path", "kind", "base", "format", "rank", "alpha", "dtype", "tensors"):
        click.echo(f"{key:8} {result[key] if result[key] is not None else '-'}")
    for key, value in result["details"].items():
        click.echo(f"{key:8} {value}")
    for warning in result["warnings"]:
        click.echo(f"warning  {warning}")


@cli.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True, dir_okay=True))
@click.option("-o", "--output", "dest", metavar="OUT", required=True, type=click.Path(),
              help="Where to write the result.")
@click.option("--to", "to", required=True,
              type=click.Choice(["kohya", "diffusers", "peft", "ldm", "a1111", "safetensors"]),
              help="LoRA: kohya|diffusers|peft; checkpoint: ldm|diffusers; embedding: a1111|kohya|diffusers; "
              "hypernetwork: safetensors|a1111.")
@click.option("--base", type=click.Choice(["sd1", "sd2", "sdxl"]),
              help="LoRA: read it as this base instead of the detected one.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--token", help="Embedding: the token (name) to store where the target format has one.")
@click.option("--rank", type=click.IntRange(min=1), help="LoRA: the rank to write.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), help="Checkpoint: the dtype to write.")
@click.option("--prune-ema", is_flag=True, help="Checkpoint: leave out the EMA weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def convert(src: str, dest: str, to: str, as_json: bool, **options: Any) -> None:
    """Convert IN to another format of the same kind, written to OUT (never over IN)."""
    from adapterzoo.formats.convert import convert as convert_path

    report = convert_path(src, dest, to, **options)
    if as_json:
        emit_json(report)
        return
    click.echo(f"{report['kind']} {report['from']} -> {report['to']}")
    for path in report["outputs"]:
        click.echo(f"wrote    {path}")
    for warning in report.get("warnings", []):
        click.echo(f"warning  {warning}")


@cli.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the counts and every entry found as JSON.")
@click.pass_obj
def scan(obj: dict[str, Any], dirs: tuple[str, ...], as_json: bool) -> None:
    """Index model files and folders under DIR... into the registry (only new or changed ones are read)."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.queries import entries_by_id
    from adapterzoo.zoo.scan import scan_paths

    engine = open_registry(obj["db"])
    report = scan_paths(dirs, engine, progress_bar=not as_json)
    if as_json:
        files = [e.to_json() for e in entries_by_id(engine, report.ids)]
        emit_json({**report.counts(), "problems": report.problems, "files": files})
        return
    for problem in report.problems:
        click.echo(f"{problem['status']}: {problem['path']}: {problem['error']}")
    click.echo(report.summary())


@cli.command("list")
@click.option("--kind", type=click.Choice(KINDS), help="Only entries of this kind.")
@click.option("--base", type=click.Choice(BASES), help="Only entries for this base model.")
@click.option("--query", metavar="TEXT", help="Only entries whose path or trigger words contain TEXT.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def list_(obj: dict[str, Any], kind: str | None, base: str | None, query: str | None, as_json: bool) -> None:
    """List registry entries."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.queries import list_entries

    rows = [e.to_json() for e in list_entries(open_registry(obj["db"]), kind=kind, base=base, query=query)]
    if as_json:
        emit_json(rows)
        return
    print_table(rows, ["id", "kind", "base", "format", "rank", "autov2", "status", "name"])


@cli.command()
@click.argument("ref", metavar="ID|PATH|HASH")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def show(obj: dict[str, Any], ref: str, as_json: bool) -> None:
    """Show one registry entry, found by id, path, any of its hashes, or a sha256 prefix (8+ hex)."""
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.queries import find_entry

    entry = find_entry(open_registry(obj["db"]), ref).to_json()
    if as_json:
        emit_json(entry)
        return
    for key, value in entry.items():
        if key == "metadata":
            value = f"{len(value)} keys (--json shows them)" if value else None
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = json.dumps(value, default=str)
        click.echo(f"{key:14} {'-' if value in (None, '') else value}")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the tour's files (default: a new temp folder).")
def demo(out: str | None) -> None:
    """The whole tour on a built-in tiny model, offline: build a small library, index it, and more."""
    import tempfile
    from pathlib import Path

    from adapterzoo.demo import DemoStep, run_demo

    def show(step: DemoStep) -> None:
        click.secho(f"\n== {step.title}", bold=True)
        click.echo(f"$ {step.command}")
        if step.columns:
            print_table(step.rows, step.columns)
        for line in step.lines:
            click.echo(line)

    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="adapterzoo-demo-"))
    run_demo(root, show)
    click.echo(f"\nEverything the tour made is in {root}")


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except AdapterzooError as exc:
        if "--json" in sys.argv[1:]:
            emit_json({"error": str(exc), **exc.json_details()})
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
