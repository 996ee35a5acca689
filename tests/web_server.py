"""The `adapterzoo serve` app for tests: in-process through FastAPI's TestClient, or on a real socket
(uvicorn in a thread) for a browser. Both bind the Host check to the address the client uses."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi.testclient import TestClient

from adapterzoo.web.server import build

HOST, PORT = "127.0.0.1", 7377


def client(db: Path, library: Path | None = None, host: str = HOST) -> TestClient:
    """A TestClient on the app for the registry `db`, seen at http://HOST:PORT as a browser would."""
    app, _ = build(str(db), host, PORT, library)
    return TestClient(app, base_url=f"http://{host}:{PORT}")


def csrf(test_client: TestClient) -> dict[str, str]:
    """The headers a same-origin script sends with a POST: the session's CSRF token and the page's Origin."""
    token = test_client.get("/api/session").json()["csrf"]
    return {"X-CSRF-Token": token, "Origin": str(test_client.base_url).rstrip("/")}


@contextmanager
def serving(db: Path, library: Path | None = None) -> Iterator[str]:
    """The app on a free loopback port, served by uvicorn in a thread; yields its URL."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    app, _ = build(str(db), HOST, port, library)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
