"""Write a LoRA an ops command made as the kohya file A1111 and ComfyUI load, through convert's writers."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from adapterzoo.formats.io.atomic import atomic_output
from adapterzoo.formats.lora.lora_convert import dialect_tensors
from adapterzoo.formats.lora.lora_metadata import output_metadata
from adapterzoo.formats.lora.lora_model import LoraFile


def write_kohya(lora: LoraFile, dest: Path, provenance: dict[str, str]) -> None:
    """kohya tensors with per-module alphas, ModelSpec fields for the base, and the provenance keys; a family
    with its own module space (Flux's BFL names, split q/k/v fused back exactly) names them as sd-scripts does."""
    metadata = output_metadata(lora, "kohya", dest.stem, None)
    metadata.update(provenance)
    with atomic_output(dest) as tmp:
        tensors = dialect_tensors(lora, "kohya")
        save_file(tensors, str(tmp), metadata=metadata)
