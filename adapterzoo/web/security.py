"""The page lives next to the user's files and tokens; every request passes these checks first.

- Host header: only the name/address the server was bound to (a DNS-rebinding page's Host is its own: 403).
  Bound to every address (0.0.0.0), no name can be told, and the access token guards instead.
- Access token: required on every request when bound beyond loopback — `?token=` once (it becomes a cookie,
  as Jupyter does), the cookie, or `Authorization: Bearer`.
- CSRF: a state-changing request (POST, PUT, PATCH, DELETE) needs the per-session token in X-CSRF-Token
  (pages carry it in a meta tag; GET /api/session hands it to scripts) and, when the browser names one, an
  Origin equal to the page's own. Another origin can neither read the token nor pass the Origin check.
- Every answer says: no inline or foreign scripts (CSP), no sniffing, no framing, no referrer.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = "adapterzoo_session"
TOKEN_COOKIE = "adapterzoo_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ANY_ADDRESS = {"0.0.0.0", "::", ""}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
           (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin")]


@dataclass
class Guard:
    """The server's address and secrets: what the checks compare against."""

    host: str
    port: int
    token: str | None = None  # required on every request when set (bound beyond loopback)
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    @staticmethod
    def for_address(host: str, port: int) -> Guard:
        """Loopback needs no token; any other address gets a fresh one."""
        return Guard(host, port, None if host in LOOPBACK else secrets.token_urlsafe(24))

    def allowed_host(self, header: str) -> bool:
        if self.host in ANY_ADDRESS:
            return True
        names = LOOPBACK if self.host in LOOPBACK else {self.host}
        shown = {f"[{n}]" if ":" in n else n for n in names}
        return header in shown or header in {f"{n}:{self.port}" for n in shown}

    def csrf_token(self, session: str) -> str:
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()

    def url(self) -> str:
        """The address to open, with the access token when one is needed."""
        host = "127.0.0.1" if self.host in ANY_ADDRESS else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?{urlencode({'token': self.token})}" if self.token else "")


class SecurityMiddleware:
    """Host, access token, CSRF and Origin checks, and the security headers on every answer (pure ASGI,
    so Server-Sent Events stream through untouched)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        cookies = _cookies(headers.get("cookie", ""))
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        host = headers.get("host", "")
        if not self.guard.allowed_host(host):
            await _refuse(send, 403, f"this server answers to {self.guard.host}:{self.guard.port}, not {host!r}")
            return
        new_cookies: list[str] = []
        if self.guard.token is not None:
            given = [cookies.get(TOKEN_COOKIE, ""), headers.get("authorization", "").removeprefix("Bearer "),
                     *query.get("token", [])]
            if not any(hmac.compare_digest(g.encode(), self.guard.token.encode()) for g in given if g):
                await _refuse(send, 403, "this server needs the access token that `adapterzoo serve` printed "
                                         "(open the URL it showed, with ?token=...)")
                return
            if query.get("token") and cookies.get(TOKEN_COOKIE) != self.guard.token:
                new_cookies.append(f"{TOKEN_COOKIE}={self.guard.token}; Path=/; HttpOnly; SameSite=Strict")
        session = cookies.get(SESSION_COOKIE)
        if not session or len(session) != 43:
            session = secrets.token_urlsafe(32)
            new_cookies.append(f"{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict")
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and origin != f"http://{host}":
                await _refuse(send, 403, f"refused: a request from {origin} may not change anything here")
                return
            if headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
                await _refuse(send, 403, "refused: a cross-site request may not change anything here")
                return
            if not hmac.compare_digest(headers.get(CSRF_HEADER, "").encode(),
                                       self.guard.csrf_token(session).encode()):
                await _refuse(send, 403, "refused: no valid CSRF token (X-CSRF-Token; GET /api/session gives one)")
                return
        scope.setdefault("state", {})["csrf"] = self.guard.csrf_token(session)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS,
                                      *((b"set-cookie", c.encode()) for c in new_cookies)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _cookies(header: str) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # noqa: BLE001 - a malformed Cookie header is no cookies
        return {}
    return {k: v.value for k, v in jar.items()}


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                          *HEADERS]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
