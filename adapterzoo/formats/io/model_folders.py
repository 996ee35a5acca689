"""Which folders hold one model: a diffusers pipeline, a PEFT adapter, or a PEFT adapter saved per model part.

Names only, no tensors: `scan` asks this of every folder it walks, and must not import torch to do so.
"""

from __future__ import annotations

from pathlib import Path

PIPELINE_INDEX = "model_index.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")  # parts diffusers saves adapters for


def peft_component_folders(folder: Path) -> dict[str, Path]:
    """diffusers/PEFT save one adapter per model part (unet/, text_encoder/, ...); empty if `folder` holds none.
    Only part names count, so a folder of separate adapters is never taken for one LoRA."""
    return {name: folder / name for name in PEFT_COMPONENTS if (folder / name / PEFT_CONFIG).is_file()}


def is_model_folder(path: Path) -> bool:
    """A diffusers pipeline or PEFT folder: one entry, not a folder of entries."""
    return any((path / marker).is_file() for marker in (PIPELINE_INDEX, PEFT_CONFIG)) or bool(
        peft_component_folders(path))
