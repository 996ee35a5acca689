"""The adapterzoo command line: parse, call one room, print a table or --json. No logic here."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from adapterzoo import __version__
from adapterzoo.errors import AdapterzooError


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
def cli() -> None:
    """Index, read, convert, merge and verify Stable Diffusion checkpoints and adapters."""


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
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
