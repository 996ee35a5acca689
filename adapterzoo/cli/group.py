"""The `adapterzoo` click group: the options every command shares."""

from __future__ import annotations

import click

from adapterzoo import __version__


@click.group()
@click.version_option(__version__, prog_name="adapterzoo")
@click.option(
    "--db",
    metavar="URL",
    help="Registry: an SQLAlchemy URL or an SQLite file (default: $ADAPTERZOO_DB, else registry.db "
    "in $ADAPTERZOO_HOME or the user data folder).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    metavar="N",
    help="CPU threads for tensor work (default: $OMP_NUM_THREADS, else the cores this process may use).",
)
@click.pass_context
def cli(ctx: click.Context, db: str | None, threads: int | None) -> None:
    """Index, read, convert, merge and verify Stable Diffusion checkpoints and adapters."""
    ctx.obj = {"db": db, "threads": threads}
