"""Trigger words and preview image of an indexed file, from its metadata and the sidecars beside it.

Sidecars share the model's name without its extension: A1111 writes `<name>.json` ("activation
text"), Civitai helpers `<name>.civitai.info` (the API's model version, with "trainedWords") and
`<name>.preview.png`. Unreadable sidecars are ignored: they never make the model file broken.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.json_file import read_json_object

PREVIEW_SUFFIXES = (".preview.png", ".png", ".jpg", ".webp")
A1111_SIDECAR = ".json"
CIVITAI_SIDECAR = ".civitai.info"
SIDECAR_SUFFIXES = (A1111_SIDECAR, CIVITAI_SIDECAR)
BESIDE_SUFFIXES = PREVIEW_SUFFIXES + SIDECAR_SUFFIXES  # every name that changes what a file's row says
TOP_TAGS = 10  # the most frequent training tags; the trigger tag is usually in every caption


def sidecar_stem(path: Path, is_folder: bool) -> Path:
    """`Lora/foo.safetensors` -> `Lora/foo`; a folder `foo` keeps its whole name."""
    return path if is_folder else path.with_suffix("")


def find_preview(stem: Path, names: Collection[str]) -> str | None:
    """The first preview image beside the file; `names` lists the folder, so nothing is stat'ed."""
    for suffix in PREVIEW_SUFFIXES:
        if stem.name + suffix in names:
            return str(stem.with_name(stem.name + suffix))
    return None


def sidecars(stem: Path, names: Collection[str]) -> list[Path]:
    """The A1111 / Civitai JSON sidecars that exist beside the file."""
    return [stem.with_name(stem.name + s) for s in SIDECAR_SUFFIXES if stem.name + s in names]


def own_tokens(kind: str, details: dict[str, Any], stem: Path) -> list[str]:
    """The words that call an embedding or a LoRA's embedded tokens up: a diffusers embedding's and a
    cloneofsimo LoRA's tokens (`<s1>`), else an embedding's file name (what A1111 and ComfyUI match)."""
    tokens = details.get("tokens") or details.get("embedded_tokens") or []
    if kind == "embedding" and not tokens:
        tokens = [stem.name]
    return [t for t in tokens if isinstance(t, str)]


def trigger_words(metadata: dict[str, str], stem: Path, names: Collection[str],
                  tokens: Collection[str] = ()) -> list[str]:
    """Own tokens, then the modelspec trigger phrase, sidecar words, top training tags; no duplicates."""
    words: list[str] = [*tokens, metadata.get("modelspec.trigger_phrase", "")]
    for sidecar in sidecars(stem, names):
        data = _read_json(sidecar)
        if sidecar.name.endswith(CIVITAI_SIDECAR):
            trained = data.get("trainedWords")
            if isinstance(trained, list):
                words.extend(w for w in trained if isinstance(w, str))
        elif isinstance(data.get("activation text"), str):
            words.append(data["activation text"])
    words.extend(top_tags(metadata.get("ss_tag_frequency", "")))
    out: list[str] = []
    seen: set[str] = set()
    for word in (w.strip() for w in words):
        if word and word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return out


def top_tags(tag_frequency: str, limit: int = TOP_TAGS) -> list[str]:
    """The `limit` most frequent training tags, most frequent first."""
    return [tag for tag, _ in tag_counts(tag_frequency)[:limit]]


def tag_counts(tag_frequency: str) -> list[tuple[str, int]]:
    """kohya's `ss_tag_frequency` is JSON {dataset_dir: {tag: count}}: (tag, count summed over the folders),
    most frequent first; anything else in it is left out."""
    try:
        per_dir = json.loads(tag_frequency) if tag_frequency else {}
    except json.JSONDecodeError:
        return []
    counts: Counter[str] = Counter()
    for tags in per_dir.values() if isinstance(per_dir, dict) else ():
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            if isinstance(count, int) and str(tag).strip():
                counts[str(tag).strip()] += count
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _read_json(path: Path) -> dict[str, Any]:
    """A sidecar that is not a JSON object adds no trigger words; it never fails a scan."""
    try:
        return read_json_object(path)
    except BadFileError:
        return {}
