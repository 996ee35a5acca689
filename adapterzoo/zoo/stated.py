"""What a source says a file is, held against what its tensors say (issue 17 §1): a Civitai baseModel label names a
base, and some name more (SDXL's Pony/Illustrious/NoobAI family, SD3.5's size), through the model families'
declarations. The tensors win; a label they contradict is a warning in pull, enrich and show. Where the file itself
names no family, the label's is taken (`list --family`).
"""

from __future__ import annotations

from typing import Any

from adapterzoo.formats.model.registry import civitai_details

UNKNOWN = "unknown"


def _agree(found: str, said: str) -> bool:
    """One value the same as the other or a member of it (`large-turbo` has `large`'s tensors)."""
    return found == said or found.startswith(said + "-") or said.startswith(found + "-")


def read_from_file(details: dict[str, Any], key: str) -> bool:
    """Whether `details[key]` is the file's own word: present, and not marked a default (`<key>_from: null`)."""
    return details.get(key) is not None and not (f"{key}_from" in details and details[f"{key}_from"] is None)


def disagreements(stated_base: str | None, label: str | None, base: str, details: dict[str, Any]) -> list[str]:
    """One line per thing the source (`label`, its `stated_base`) says that the file's probe contradicts."""
    if not stated_base or stated_base == UNKNOWN or base == UNKNOWN:
        return []
    if stated_base != base:
        if stated_base in details.get("also_fits", ()):
            return []
        return [f"the source says base {label or stated_base} but the file is {base}"]
    notes = []
    for key, said in civitai_details(label).items():
        if read_from_file(details, key) and not _agree(str(details[key]), said):
            where = details.get(f"{key}_from")
            notes.append(f"the source says {label} ({key} {said}) but the file is {key} {details[key]}"
                         + (f" (its {where})" if where else ""))
    return notes


def source_warnings(base: str, details: dict[str, Any], sources: list[Any]) -> list[str]:
    """What each recorded source (a `Source` row: base, base_stated) says that the file contradicts, once each."""
    notes = (note for source in sources for note in disagreements(source.base, source.base_stated, base, details))
    return list(dict.fromkeys(notes))


def stated_detail(details: dict[str, Any], labels: list[str | None], key: str) -> str | None:
    """A file's `key` (its family): its own word, else the first source label's, else its default."""
    if read_from_file(details, key):
        return str(details[key])
    return next((said[key] for label in labels if key in (said := civitai_details(label))), details.get(key))
