"""File names a server offers, made safe to create: a hostile Content-Disposition must not write
outside the destination folder or produce a name Windows or a shell chokes on."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote, urlsplit

# RFC 6266 / RFC 5987: filename*=charset'language'percent-encoded, and filename="quoted" or token.
_EXTENDED = re.compile(r"""(?:^|;)\s*filename\*\s*=\s*([\w!#$%&+^`{}~.-]*)'[^']*'([^;\s]*)""", re.IGNORECASE)
_PLAIN = re.compile(r"""(?:^|;)\s*filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))""", re.IGNORECASE)
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"/\\|?*]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"{p}{n}" for p in ("COM", "LPT") for n in "123456789¹²³")}
MAX_NAME_BYTES = 200  # under the usual 255-byte limit, leaving room for ".part" and ".<autov2>"


def content_disposition_name(header: str | None) -> str | None:
    """The file name a Content-Disposition header offers, unsanitised: `filename*=` first, then `filename=`."""
    if not header:
        return None
    if match := _EXTENDED.search(header):
        charset, encoded = match.groups()
        try:
            return unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):
            pass  # a broken extended form: fall back to the plain one
    if match := _PLAIN.search(header):
        quoted, token = match.groups()
        return _raw_utf8(re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else token)
    return None


def _raw_utf8(value: str) -> str:
    """Servers put raw UTF-8 in `filename=`; HTTP clients decode header bytes as latin-1. Undo that."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def url_name(url: str) -> str:
    """The last path segment of a URL, percent-decoded: the name when the server offers none."""
    return unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])


def safe_file_name(name: str) -> str | None:
    """`name` reduced to one harmless path component, or None when nothing usable is left.

    Keeps only the last path part (either slash), drops control and format characters (which hide
    a real extension, like U+202E), replaces characters Windows forbids, strips leading dots and
    spaces and trailing ones, prefixes Windows' reserved device names, and caps the length.
    """
    name = name.replace("\\", "/").rpartition("/")[2]
    name = "".join(c for c in name if unicodedata.category(c) not in ("Cc", "Cf"))
    name = _WINDOWS_FORBIDDEN.sub("_", name).lstrip(". ").rstrip(". ")
    if not name:
        return None
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        name = f"_{name}"
    return _shorten(name)


def _shorten(name: str) -> str:
    """Cut the stem, not the extension, until the UTF-8 name fits MAX_NAME_BYTES."""
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or len(suffix.encode()) > 16:
        stem, dot, suffix = name, "", ""
    room = MAX_NAME_BYTES - len(f"{dot}{suffix}".encode())
    return stem.encode()[:room].decode(errors="ignore") + dot + suffix
