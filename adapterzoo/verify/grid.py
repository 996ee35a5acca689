"""The test grid: a labelled PNG (rows prompt × seed, columns multipliers) that carries its parameters.

The `parameters` text chunk is what A1111 writes and reads back as "PNG Info": the prompt on the
first line, then `Steps: ..., Sampler: ..., Seed: ..., ...` — here also the file's and the
checkpoint's SHA-256, the multipliers and the versions, so a grid says what it proves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from adapterzoo.formats.io.atomic import atomic_output

PAD = 6
FONT_SIZE = 13  # PIL's default font at a size that keeps its spaces visible
LINE = 16  # pixels per label line


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: Any) -> list[str]:
    """Greedy word wrap into lines no wider than `width` (a word too long for a line is cut)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and _text_width(draw, candidate, font) <= width:
            lines[-1] = candidate
            continue
        while _text_width(draw, word, font) > width and len(word) > 1:
            word = word[:-1]
        lines.append(word)
    return lines or [""]


def draw_grid(cells: list[list[torch.Tensor]], row_labels: list[str], column_labels: list[str]) -> Image.Image:
    """cells[row][column]: [H, W, 3] images on the 0–255 scale (NaN drawn black)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    height, width = cells[0][0].shape[:2]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(120, min(240, max(_text_width(probe, label, font) for label in row_labels) + 2 * PAD))
    top = LINE + 2 * PAD
    grid = Image.new("RGB", (label_width + len(column_labels) * (width + PAD), top + len(cells) * (height + PAD)),
                     "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        x = label_width + column * (width + PAD)
        draw.text((x + max(0, (width - _text_width(draw, label, font)) // 2), PAD), label, fill="black", font=font)
    for row, (images, label) in enumerate(zip(cells, row_labels)):
        y = top + row * (height + PAD)
        lines = _fit(draw, label, label_width - 2 * PAD, font)[: max(1, height // LINE)]
        for i, line in enumerate(lines):
            draw.text((PAD, y + i * LINE), line, fill="black", font=font)
        for column, image in enumerate(images):
            pixels = image.nan_to_num(0.0).clamp(0, 255).to(torch.uint8).numpy()
            grid.paste(Image.fromarray(pixels, "RGB"), (label_width + column * (width + PAD), y))
    return grid


# the guidance a render records (verify's parameters, sample's PNG): CFG's scale, or a model's own words
GUIDANCE_LABELS = {"cfg_scale": "CFG scale", "distilled_guidance": "Distilled guidance", "guidance": "Guidance"}
RESOURCE_HASHES = {"lora": "Lora hashes", "lycoris": "Lora hashes", "embedding": "TI hashes"}  # A1111's field names


def autov2(sha256: str | None) -> str | None:
    """A1111's short model hash (AutoV2), by which A1111, Forge and Civitai's uploader know a resource."""
    return sha256[:10] if sha256 else None


def resource_hashes(files: list[tuple[str, str | None]]) -> str:
    """`name: autov2, ...` of (file, SHA-256) pairs, named as a prompt names them (`<lora:name:1>`)."""
    return ", ".join(f"{Path(file).stem}: {autov2(sha)}" for file, sha in files)


def parameters_text(parameters: dict[str, Any]) -> str:
    """A1111's layout: the first prompt, then `Key: value` pairs on one line."""
    fields = {
        "Steps": parameters["steps"],
        "Sampler": parameters["sampler"],
        **guidance_text({k: v for k, v in parameters.items() if k in GUIDANCE_LABELS}),
        **({"Shift": parameters["shift"]} if parameters.get("shift") is not None else {}),
        "Seed": ", ".join(str(s) for s in parameters["seeds"]),
        "Size": "x".join(str(v) for v in parameters["size"]),
        "Model": parameters["checkpoint"],
        "Model hash": autov2(parameters["checkpoint_sha256"]),
        "Model SHA256": parameters["checkpoint_sha256"],
        **({RESOURCE_HASHES[parameters["kind"]]: json.dumps(resource_hashes([(parameters["file"], parameters["sha256"])]))}
           if parameters["kind"] in RESOURCE_HASHES else {}),
        "File": parameters["file"],
        "File SHA256": parameters["sha256"],
        "Kind": parameters["kind"],
        "Multipliers": ", ".join(f"{m:g}" for m in parameters["multipliers"]) or "none",
        "Prompts": json.dumps(parameters["prompts"], ensure_ascii=False),
        "Device": parameters["device"],
        "Dtype": parameters["dtype"],
        "Version": versions_text(parameters["versions"]),
    }
    return a1111_text(parameters["prompts"][0], fields)


def guidance_text(fields: dict[str, Any]) -> dict[str, Any]:
    """The guidance a render used, in A1111's words: `CFG scale: 7.0`, or what a model without CFG records
    (`Distilled guidance: 3.5`, `Guidance: none`)."""
    return {GUIDANCE_LABELS[key]: value for key, value in fields.items() if key in GUIDANCE_LABELS}


def versions_text(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def a1111_text(prompt: str, fields: dict[str, Any], negative_prompt: str = "") -> str:
    """The prompt, A1111's `Negative prompt:` line when there is one, then `Key: value` pairs on one line."""
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n" + ", ".join(f"{k}: {v}" for k, v in fields.items())


def save_png(path: Path, image: Image.Image, text: str) -> None:
    """Write the PNG atomically with `text` as its `parameters` text chunk."""
    info = PngInfo()
    info.add_text("parameters", text)
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def save_grid(path: Path, image: Image.Image, parameters: dict[str, Any]) -> None:
    """Write the PNG atomically with its `parameters` text chunk."""
    save_png(path, image, parameters_text(parameters))
