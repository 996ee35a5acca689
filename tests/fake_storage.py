"""A download host and a signed-URL storage host on 127.0.0.1, misbehaving on request.

`GET {api}/api/download/models/<key>` answers 307 to `{storage}/<key>?sig=...`, as Civitai does. The
storage refuses any request that carries an Authorization header (signed URLs allow one auth
mechanism only). Each file is a `Served`: its bytes and headers, and how the servers should fail.
Every request is recorded in `FakeStorage.seen` so tests can check what the client sent where.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOGIN_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in | Civitai</title></head><body>Log in</body></html>\n"


@dataclass
class Served:
    data: bytes
    content_disposition: str | None = 'attachment; filename="model.safetensors"'
    content_type: str = "application/octet-stream"
    status: int = 200  # storage answers this instead of the file (403 expired signature, ...)
    etag: str | None = None  # defaults to one derived from the bytes
    cut_at: int | None = None  # send the body up to this file offset, then drop the connection
    cuts: int = 1  # how many answers are cut
    ignore_range: bool = False
    ignore_if_range: bool = False  # serve the asked range even when the file changed since
    throttle: list[tuple[int, str | None]] = field(default_factory=list)  # (status, Retry-After) answered first
    token: str | None = None  # the download host wants "Authorization: Bearer <token>"
    piece_delay_s: float = 0.0  # pause between 64 KiB pieces: a slow transfer

    def tag(self) -> str:
        return self.etag or f'"{hashlib.sha256(self.data).hexdigest()[:16]}"'


@dataclass
class Seen:
    server: str
    path: str
    headers: dict[str, str]


class FakeStorage:
    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._servers = {name: _start(self, name) for name in ("api", "storage")}

    def url(self, server: str) -> str:
        host, port = self._servers[server].server_address[:2]
        return f"http://{host}:{port}"

    def add(self, key: str, served: Served) -> str:
        """Serve `served` under `key`; returns its download URL on the api host."""
        self.files[key] = served
        return f"{self.url('api')}/api/download/models/{key}"

    def requests_to(self, server: str) -> list[Seen]:
        return [s for s in self.seen if s.server == server]

    def close(self) -> None:
        for server in self._servers.values():
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _start(fake: FakeStorage, name: str) -> ThreadingHTTPServer:
    handler = type(f"{name.title()}Handler", (_Handler,), {"fake": fake, "server_name": name})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True, name=f"fake-{name}").start()
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeStorage
    server_name: str

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        with self.fake._lock:
            self.fake.seen.append(Seen(self.server_name, self.path, dict(self.headers.items())))
        if self.server_name == "api":
            self._api()
        else:
            self._storage()

    def _api(self) -> None:
        key = self.path.split("?")[0].removeprefix("/api/download/models/")
        served = self.fake.files.get(key)
        if served is None:
            return self._answer(404, json.dumps({"error": "Model not found"}).encode(), "application/json")
        if served.token and self.headers.get("Authorization") != f"Bearer {served.token}":
            return self._answer(401, json.dumps({"error": "Unauthorized"}).encode(), "application/json")
        location = f"{self.fake.url('storage')}/{key}?sig={secrets.token_hex(8)}"
        self._answer(307, b"", "text/plain", {"Location": location})

    def _storage(self) -> None:
        if "Authorization" in self.headers:
            body = b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>"
            return self._answer(400, body, "application/xml")
        served = self.fake.files.get(self.path.split("?")[0].lstrip("/"))
        if served is None:
            return self._answer(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
        if served.throttle:
            status, retry_after = served.throttle.pop(0)
            return self._answer(status, b"slow down", "text/plain", {"Retry-After": retry_after} if retry_after else {})
        if served.status != 200:
            return self._answer(served.status, b"<Error><Code>AccessDenied</Code></Error>", "application/xml")
        self._file(served)

    def _file(self, served: Served) -> None:
        data, start = served.data, 0
        wanted = self.headers.get("Range", "")
        if_range = self.headers.get("If-Range")
        if wanted.startswith("bytes=") and not served.ignore_range and (
            served.ignore_if_range or if_range in (None, served.tag())):
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                return self._answer(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
        headers = {"ETag": served.tag(), "Accept-Ranges": "bytes"}
        if served.content_disposition is not None:
            headers["Content-Disposition"] = served.content_disposition
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.send_response(206 if start else 200)
        for key, value in {**headers, "Content-Type": served.content_type,
                           "Content-Length": str(len(data) - start)}.items():
            self.send_header(key, value)
        self.end_headers()
        end = len(data)
        if served.cut_at is not None and served.cuts > 0 and start < served.cut_at:
            served.cuts -= 1
            end = served.cut_at
        for position in range(start, end, 64 << 10):
            self.wfile.write(data[position:min(position + (64 << 10), end)])
            if served.piece_delay_s:
                time.sleep(served.piece_delay_s)
        if end < len(data):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def _answer(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {**(headers or {}), "Content-Type": content_type,
                           "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
