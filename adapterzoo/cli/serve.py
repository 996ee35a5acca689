"""serve: the library as a web page (adapterzoo/web/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterzoo.cli.group import cli


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback requires an access token, printed with the URL.")
@click.option("--port", type=click.IntRange(1, 65535), default=7377, show_default=True, help="Port to listen on.")
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--library", type=click.Path(file_okay=False), metavar="DIR",
              help="Where the page's Pull puts files, as `pull --library` (default: <adapterzoo home>/library).")
@click.option("--layout", type=click.Choice(["a1111", "comfyui"]), default="a1111", show_default=True,
              help="The --library's layout.")
@click.pass_obj
def serve(obj: dict[str, Any], host: str, port: int, open_browser: bool, library: str | None, layout: str) -> None:
    """Browse, search, pull and verify in a web page, on the registry the other commands use."""
    from adapterzoo.web.server import serve as run

    run(obj["db"], host, port, open_browser, Path(library) if library else None, layout,
        lambda line: click.echo(line, err=False))
