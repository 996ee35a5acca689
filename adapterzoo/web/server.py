"""`adapterzoo serve`: build the app for the registry and run it on uvicorn in this process."""

from __future__ import annotations

import threading
import webbrowser
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from adapterzoo.errors import AdapterzooError
from adapterzoo.web.actions import Context
from adapterzoo.web.app import create_app
from adapterzoo.web.security import Guard
from adapterzoo.zoo.db import connect, home_folder, registry_url

DEFAULT_PORT = 7377


def build(db: str | None, host: str, port: int, library: Path | None = None, layout: str = "a1111"
          ) -> tuple[FastAPI, Guard]:
    """(the app, its guard): the registry opened as the CLI opens it; pulls go to `library` (default: the
    `library` folder of the adapterzoo home)."""
    url = registry_url(db)
    engine = connect(url)
    home = home_folder()
    context = Context(engine, url, (library or home / "library").absolute(), layout, home)
    guard = Guard.for_address(host, port)
    return create_app(engine, context, guard), guard


def serve(db: str | None, host: str, port: int, open_browser: bool, library: Path | None, layout: str,
          announce: Callable[[str], None]) -> None:
    """Run until interrupted; `announce` gets the line with the URL (and the access token, if one is needed)."""
    import socket

    import uvicorn

    try:
        with socket.create_server((host, port)):
            pass  # uvicorn would say so in a log line and a traceback-free exit, after building everything
    except OSError as exc:
        raise AdapterzooError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    app, guard = build(db, host, port, library, layout)
    announce(f"adapterzoo serve: {guard.url()}")
    if guard.token:
        announce("bound beyond this machine: every request needs that token (it is in the URL above)")
    if open_browser:
        threading.Timer(1.0, webbrowser.open, [guard.url()]).start()
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
