"""The file page's picture of where a LoRA acts: per-block ‖ΔW‖_F (ops/block_norms.py) as an SVG heat map,
one row for the UNet or transformer and one per text encoder. Norms are computed once per content hash."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from adapterzoo.zoo.home_cache import cached_json
from adapterzoo.zoo.models import FileEntry

MAPPED_KINDS = ("lora", "lycoris")
CACHE_KIND = "blocks-v1"
# viridis at 0, .25, .5, .75, 1: dark where the LoRA barely acts, bright where it acts most
STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
ROW_NAMES = {"unet": "UNet / transformer", "te": "text encoder", "te1": "text encoder 1",
             "te2": "text encoder 2", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2",
             "clip_l": "CLIP-L", "t5xxl": "T5-XXL"}
CELL, GAP, LABEL_W, ROW_H = 28, 3, 130, 48


def mappable(entry: FileEntry) -> bool:
    return entry.kind in MAPPED_KINDS and not entry.is_folder and entry.sha256 is not None and entry.status == "ok"


def blocks_of(entry: FileEntry) -> list[dict[str, Any]]:
    """The entry's blocks with their norms (empty for what is not a readable LoRA file)."""
    if not mappable(entry):
        return []
    from adapterzoo.ops.block_norms import block_norms

    return cached_json(CACHE_KIND, entry.sha256, lambda: [asdict(b) for b in block_norms(Path(entry.path))])


def colour(share: float) -> str:
    """The viridis colour of a share in [0, 1], as #rrggbb."""
    share = min(max(share, 0.0), 1.0) * (len(STOPS) - 1)
    low = min(int(share), len(STOPS) - 2)
    t = share - low
    rgb = [round(a + (b - a) * t) for a, b in zip(STOPS[low], STOPS[low + 1])]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def short(label: str) -> str:
    """'down 0' -> 'd0', 'layer 11' -> '11', 'double 7' -> 'D7', 'single 30' -> 'S30': what fits under a cell."""
    for word, letter in (("down ", "d"), ("up ", "u"), ("in ", "i"), ("out ", "o"), ("layer ", ""), ("double ", "D"),
                         ("single ", "S")):
        if label.startswith(word):
            return letter + label.removeprefix(word)
    return {"mid": "m", "other": "…"}.get(label, label)


def layout(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of cells with their positions and colours (the template draws them), scaled to the largest norm."""
    top = max((b["norm"] for b in blocks), default=0.0) or 1.0
    rows: dict[str, list[dict[str, Any]]] = {}
    for block in blocks:
        rows.setdefault(block["component"], []).append(block)
    drawn = []
    for index, (component, cells) in enumerate(rows.items()):
        y = index * ROW_H
        drawn.append({"name": ROW_NAMES.get(component, component), "y": y, "cells": [
            {**cell, "x": LABEL_W + i * (CELL + GAP), "y": y, "fill": colour(cell["norm"] / top),
             "short": short(cell["label"])}
            for i, cell in enumerate(cells)]})
    widest = max((len(r["cells"]) for r in drawn), default=0)
    return {"rows": drawn, "width": LABEL_W + widest * (CELL + GAP) + 10, "height": len(drawn) * ROW_H + 4,
            "cell": CELL, "top": top}
