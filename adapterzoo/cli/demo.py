"""demo: the whole tour on a built-in tiny model."""

from __future__ import annotations

from pathlib import Path

import click

from adapterzoo.cli.group import cli
from adapterzoo.cli.output import print_table


@cli.command()
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for the tour's files (default: a new temp folder).")
def demo(out: str | None) -> None:
    """The whole tour on a built-in tiny model, offline: build a small library, index it, and more."""
    import tempfile

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
