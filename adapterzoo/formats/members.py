"""Members of a family that the weights cannot tell apart (the same tensor names and shapes), which a probe reads
from a file name or metadata: the `details` facts each family lists as `Family.unconfirmed_members`, with where
each was read in `details["read_from"]`. A LoRA trained for one member still fits the other by every shape, so
merging it there would pass silently; the files' own words are all there is, and two files that say different
things are refused in one line (or, when the user says so, merged with a warning).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.model.registry import family_of

OVERRIDE = "--allow-variant-mismatch"  # the option of merge and merge-loras that turns the refusal into a warning


def declared(found: ProbeResult) -> dict[str, tuple[str, str]]:
    """fact -> (value, where it was read) of each member fact of its family that `found` declares."""
    family = family_of(found.base)
    if family is None:
        return {}
    read_from = found.details.get("read_from", {})
    return {fact: (str(found.details[fact]), read_from.get(fact, "name"))
            for fact in family.unconfirmed_members if found.details.get(fact)}


def check_members(files: Iterable[tuple[Path, ProbeResult]], allow: bool) -> list[str]:
    """Refuse a file that declares another member than the first file of its base to declare one (a file that
    declares none agrees with any); with `allow`, each such disagreement is a warning, returned."""
    first: dict[tuple[str, str], tuple[Path, str, str]] = {}  # (base, fact) -> (file, value, where)
    warnings = []
    for path, found in files:
        for fact, (value, where) in declared(found).items():
            other, theirs, there = first.setdefault((found.base, fact), (path, value, where))
            if theirs == value:
                continue
            title = family_of(found.base).title
            said = (f"{Path(other).name} declares {title} {fact} {theirs} (read from its {there}) but {Path(path).name} "
                    f"declares {fact} {value} (read from its {where}); the two have the same tensor names and shapes, "
                    "so only these names tell them apart")
            if not allow:
                raise AdapterzooError(f"{said} ({OVERRIDE} merges them anyway)")
            warnings.append(f"{said}: merged anyway ({OVERRIDE})")
    return warnings
