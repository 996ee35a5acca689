"""What every file an ops command writes says about how it was made: enough to redo it on the same bytes.

`modelspec.merged_from` is ModelSpec's field for merges (kohya writes the inputs' names joined by ", ");
`adapterzoo.operation` is our own JSON: the operation, each input's name, SHA-256, weight and role, the
settings (method, rank rule, device, dtype...) and the adapterzoo version. ops never imports zoo, so the
caller hashes the inputs and hands them in as `Source`s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterzoo import __version__
from adapterzoo.ops.lowrank import Rank, Rule, SvCumulative, SvFro, SvRatio

OPERATION_KEY = "adapterzoo.operation"
MERGED_FROM_KEY = "modelspec.merged_from"
MERGE_OPERATIONS = frozenset({"merge", "merge-loras"})  # whose output is a merge in ModelSpec's sense

# The caller's SHA-256 of an input: a file's hex digest, or a folder's {relative path: hex digest}. Ops take it
# as a function so they hash only after every check passed (hashing gigabytes to then refuse helps no one).
Hasher = Callable[[Path], str | dict[str, str]]


@dataclass(frozen=True)
class Source:
    """One input of an operation. A folder's `sha256` maps each file's relative path to its SHA-256."""

    path: Path
    sha256: str | dict[str, str]
    weight: float | None = None  # its multiplier in a merge
    role: str | None = None  # what it is to the operation when the order alone doesn't say: base, tuned, lora...

    def to_json(self) -> dict[str, Any]:
        """Name only, never the local path (it says where a user keeps files, and nothing about the bytes)."""
        entry: dict[str, Any] = {"name": Path(self.path).name, "sha256": self.sha256}
        if self.weight is not None:
            entry["weight"] = self.weight
        if self.role is not None:
            entry["role"] = self.role
        return entry


def rule_setting(rule: Rule) -> dict[str, float]:
    """A rank rule as the command-line flag that asks for it: {"rank": 32}, {"sv_fro": 0.9}, ..."""
    if isinstance(rule, Rank):
        return {"rank": rule.n}
    if isinstance(rule, SvRatio):
        return {"sv_ratio": rule.x}
    if isinstance(rule, SvFro):
        return {"sv_fro": rule.x}
    if isinstance(rule, SvCumulative):
        return {"sv_cumulative": rule.x}
    raise TypeError(f"not a rank rule: {rule!r}")


def provenance_metadata(operation: str, sources: Sequence[Source], **settings: Any) -> dict[str, str]:
    """safetensors `__metadata__` entries (strings) recording `operation` on `sources` with `settings`.

    `settings` must be JSON-serialisable; None values are left out. Merges also get `modelspec.merged_from`.
    """
    record: dict[str, Any] = {"op": operation, "inputs": [source.to_json() for source in sources]}
    record.update({key: value for key, value in settings.items() if value is not None})
    record["version"] = __version__
    metadata = {OPERATION_KEY: json.dumps(record, sort_keys=False)}
    if operation in MERGE_OPERATIONS:
        metadata[MERGED_FROM_KEY] = ", ".join(Path(source.path).name for source in sources)
    return metadata
