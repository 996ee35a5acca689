"""Read the small JSON files beside weights (model_index.json, config.json, adapter_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

from adapterzoo.errors import BadFileError


def read_json_object(path: Path) -> dict:
    """The file's JSON object, or BadFileError saying why it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFileError(f"{path} is not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BadFileError(f"{path} is not a JSON object")
    return data
