"""What adapterzoo computes once per file content and keeps in its home folder (cache/<kind>/<key>):
thumbnails and per-block norms, keyed by a content hash so a moved or renamed file finds its entry again."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterzoo.formats.io.atomic import atomic_output
from adapterzoo.zoo.db import home_folder

KEY = re.compile(r"[0-9a-f]{16,64}")


def cache_path(kind: str, key: str, suffix: str) -> Path:
    """<home>/cache/<kind>/<key><suffix>; `key` must be a hex digest, so it can never name another folder."""
    if not KEY.fullmatch(key):
        raise ValueError(f"cache key must be a hex digest, not {key!r}")
    folder = home_folder() / "cache" / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}{suffix}"


def cached_json(kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """The JSON value kept for `key`, computed and written (atomically) the first time."""
    path = cache_path(kind, key, ".json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    value = compute()
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(value), encoding="utf-8")
    return value
