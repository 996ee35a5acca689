"""One GET of a file, as a download needs it: redirects followed by hand so credentials stay on the
host they were meant for, 429, 5xx, timeouts and cut connections retried politely, a host that does not
resolve or refuses the connection given up at once, and every other answer that is not the file turned
into one line that says why (token needed, refused, no such file)."""

from __future__ import annotations

import email.utils
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import urljoin, urlsplit

import requests

from adapterzoo.errors import AdapterzooError

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10
TIMEOUT_S = (10.0, 60.0)  # connect, and between bytes: a stalled transfer is cut and resumed
NOT_A_FILE_TYPES = ("text/html", "application/xhtml+xml", "application/json", "text/json")


@dataclass(frozen=True)
class Host:
    """Who serves the file, in the words a user sees: 'Civitai' and the variable its token lives in."""

    name: str = "the server"
    token_env: str | None = None

    def not_a_file(self, what: str, token_sent: bool) -> AdapterzooError:
        if token_sent:
            why = "the token was not accepted for this file"
        elif self.token_env:
            why = f"this version needs a token, set {self.token_env}"
        else:
            why = "it may need a login"
        return AdapterzooError(f"{self.name} answered with {what}, not a file: {why}")


@dataclass(frozen=True)
class Retry:
    """How hard to try: `attempts` tries per request on 429, 5xx and cut connections, waiting
    `backoff_s` doubled each time (or what Retry-After says), never longer than `max_wait_s`."""

    attempts: int = 5
    backoff_s: float = 1.0
    max_wait_s: float = 120.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)

    def delay(self, failures: int, retry_after: str | None = None) -> float:
        """Seconds to wait before try number `failures` + 1; Retry-After wins when the server sends it."""
        asked = _retry_after_s(retry_after)
        return self.backoff_s * 2 ** (failures - 1) if asked is None else asked


def token_sent(headers: Mapping[str, str] | None) -> bool:
    return any(key.lower() == "authorization" for key in headers or {})


def get_file(
    session: requests.Session,
    url: str,
    *,
    headers: Mapping[str, str] | None,
    host: Host,
    retry: Retry,
    start: int = 0,
    if_range: str | None = None,
) -> requests.Response:
    """A streaming answer carrying the file (200), its bytes from `start` (206), or 416 (nothing past
    `start`). `headers` go to the first URL's scheme, host and port only, never to a redirect target
    elsewhere: signed storage URLs refuse a request with an Authorization header, and a token must
    not leak to a third party. Anything else raises AdapterzooError in one line.
    """
    # identity: Range counts the bytes on the wire, and a gzipped answer would not be the file's bytes
    ranged = {"Accept-Encoding": "identity", **({"Range": f"bytes={start}-"} if start else {})}
    if start and if_range:
        ranged["If-Range"] = if_range
    failures = 0
    while True:
        try:
            response = _follow(session, url, headers or {}, ranged)
        except (requests.ConnectionError, requests.Timeout) as exc:
            if is_final(exc):
                raise AdapterzooError(f"no network: could not reach {host.name} ({_reason(exc)})") from None
            failures = wait_or_raise(retry, failures, None, f"cannot reach {host.name}: {_reason(exc)}")
            continue
        if response.status_code == 429 or response.status_code >= 500:
            response.close()
            failures = wait_or_raise(
                retry, failures, response.headers.get("Retry-After"),
                f"{host.name} answered {response.status_code} {response.reason}",
            )
            continue
        _check_status(response, host, token_sent(headers), url)
        return response


def _follow(
    session: requests.Session, url: str, headers: Mapping[str, str], ranged: Mapping[str, str]
) -> requests.Response:
    """GET `url`, following redirects ourselves so we decide which headers each hop gets."""
    origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        sent = {**(headers if _origin(url) == origin else {}), **ranged}
        try:
            response = session.get(url, headers=sent, stream=True, allow_redirects=False, timeout=TIMEOUT_S)
        except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema) as exc:
            raise AdapterzooError(f"cannot download: {exc}") from None
        if response.status_code not in REDIRECTS or "Location" not in response.headers:
            return response
        response.close()
        url = urljoin(url, response.headers["Location"])
    raise AdapterzooError(f"more than {MAX_REDIRECTS} redirects from {origin[1]}; giving up")


def _check_status(response: requests.Response, host: Host, with_token: bool, url: str) -> None:
    status = response.status_code
    if status in (200, 206, 416):
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if status != 416 and content_type in NOT_A_FILE_TYPES:
            response.close()
            raise host.not_a_file("JSON" if "json" in content_type else "a web page", with_token)
        return
    response.close()
    if status in (401, 403):
        if with_token:
            raise AdapterzooError(f"{host.name} refused the token ({status} {response.reason}): check it is "
                                  f"valid and allowed to download this file")
        needs = f", set {host.token_env}" if host.token_env else ""
        raise AdapterzooError(f"{host.name} wants a token for this file ({status} {response.reason}){needs}")
    if status in (404, 410):
        raise AdapterzooError(f"{host.name} has no such file ({status} {response.reason}): {shown_url(url)}")
    raise AdapterzooError(f"{host.name} answered {status} {response.reason} for {shown_url(url)}")


def wait_or_raise(retry: Retry, failures: int, retry_after: str | None, problem: str) -> int:
    """Sleep before the next try and return the failure count, or raise once tries or patience run out."""
    failures += 1
    if failures >= retry.attempts:
        raise AdapterzooError(f"{problem}; gave up after {failures} tries")
    delay = retry.delay(failures, retry_after)
    if delay > retry.max_wait_s:
        raise AdapterzooError(f"{problem} and asks to wait {delay:.0f} s; try again later")
    retry.sleep(delay)
    return failures


FINAL_ERRORS = ("NameResolutionError", "Name or service not known", "nodename nor servname",
                "Temporary failure in name resolution", "getaddrinfo failed", "No address associated",
                "Connection refused", "Errno 111", "Errno 61", "Errno 10061", "Network is unreachable")


def is_final(exc: BaseException) -> bool:
    """A host name that does not resolve, or a refused or unroutable connection: trying again a second later
    finds the same answer, so only timeouts, resets, 429 and 5xx are worth a retry."""
    if isinstance(exc, requests.Timeout):
        return False
    return any(mark in str(exc) for mark in FINAL_ERRORS)


def check_reachable(url: str, name: str, timeout_s: float = TIMEOUT_S[0]) -> None:
    """Raise 'no network' in one line at once when `url`'s host does not resolve or refuses connections: for
    clients (huggingface_hub) that retry such failures for half a minute before saying so."""
    scheme, host, port = _origin(url)
    try:
        socket.create_connection((host, port or 443), timeout=timeout_s).close()
    except socket.gaierror as exc:
        raise AdapterzooError(f"no network: could not resolve {name} ({str(exc.strerror or exc).lower()})") from None
    except OSError as exc:
        if isinstance(exc, TimeoutError):  # slow, not absent: let the client try, it has its own patience
            return
        raise AdapterzooError(f"no network: could not reach {name} ({str(exc.strerror or exc).lower()})") from None


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


def shown_url(url: str) -> str:
    """A URL fit to print: no query string, which may hold a token or a storage signature."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or ""), parts.port or default


def _reason(exc: BaseException) -> str:
    """What went wrong in a requests error, without urllib3's nested reprs: '[Errno 111] Connection refused'."""
    text = str(exc)
    if match := re.search(r"\[Errno -?\d+\][^'\")]*", text):
        return match.group(0).strip()
    return text[:200] or exc.__class__.__name__
