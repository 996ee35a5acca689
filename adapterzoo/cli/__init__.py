"""The adapterzoo command line: parse, call one room, print a table or --json. No logic here.

One module per group of commands; importing them registers their commands on `cli`."""

from __future__ import annotations

import sys

import click

from adapterzoo.cli import (  # noqa: F401 - registers commands
    demo,
    files,
    library,
    library_updates,
    merging,
    registry,
    roots,
    serve,
    sources,
    verifying,
)
from adapterzoo.cli.group import cli
from adapterzoo.chatter import quiet_third_parties
from adapterzoo.cli.output import emit_json
from adapterzoo.devices import quiet_openmp_waits
from adapterzoo.errors import AdapterzooError

__all__ = ["cli", "main"]


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    quiet_openmp_waits()
    quiet_third_parties()
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
