"""One SHA-256 for a file or a folder: what verify records a checkpoint by and the registry keys contents by."""

from __future__ import annotations

import json
from hashlib import sha256


def digest_of(value: str | dict[str, str]) -> str:
    """A file's SHA-256 as it is; a folder's (one SHA-256 per file, by relative path) is the SHA-256 of that
    sorted listing."""
    if isinstance(value, str):
        return value
    return sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
