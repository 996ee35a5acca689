"""The files that travel with a model: A1111's and Civitai helpers' JSON, previews, configs, notes, named
after the model (`style.safetensors` -> `style.civitai.info`, `style.preview.png`, `style.yaml`, ...)."""

from __future__ import annotations

import os
from pathlib import Path

from adapterzoo.zoo.triggers import sidecar_stem
from adapterzoo.zoo.walk import is_model_file

SIDECAR_SUFFIXES = (
    ".civitai.info", ".json", ".metadata.json", ".info", ".sha256", ".yaml", ".txt",
    ".preview.png", ".preview.jpg", ".preview.jpeg", ".preview.webp", ".png", ".jpg", ".jpeg", ".webp", ".gif",
)


def sidecar_files(model: Path, is_folder: bool) -> list[Path]:
    """The sidecars beside `model` that are its alone: none is taken when another model file in the folder has
    the same stem (`x.ckpt` beside `x.safetensors`), since it would be that one's too."""
    stem = sidecar_stem(model, is_folder)
    try:
        names = set(os.listdir(model.parent))
    except OSError:
        return []
    if any(name != model.name and is_model_file(name) and Path(name).stem == stem.name for name in names):
        return []
    return [model.parent / (stem.name + suffix) for suffix in SIDECAR_SUFFIXES if stem.name + suffix in names
            and (model.parent / (stem.name + suffix)) != model]
