"""What the fake servers share: a threaded HTTP server on 127.0.0.1:0 and a handler that answers JSON or bytes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    state: Any  # the fake's data, which the handler reads
    role: str


class Handler(BaseHTTPRequestHandler):
    """Every method goes to serve(); answer() writes one complete response (no body for HEAD)."""

    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.serve()

    def do_HEAD(self) -> None:
        self.serve()

    def do_POST(self) -> None:
        self.serve()

    def serve(self) -> None:
        raise NotImplementedError

    def answer(self, status: int, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None,
               content_type: str | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type or ("application/json" if raw is None else
                                                          "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


@contextmanager
def running(handler: type[Handler], state: Any, role: str = "") -> Iterator[str]:
    """Serve `state` with `handler` on a free port for the block; yields the base URL."""
    server = Server(("127.0.0.1", 0), handler)
    server.state, server.role = state, role
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
