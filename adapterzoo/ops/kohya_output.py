"""Write a LoRA an ops command made as the kohya file A1111 and ComfyUI load, through convert's writers."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from adapterzoo.formats.io.atomic import atomic_output
from adapterzoo.formats.lora.flux_lora_write import flux_kohya_tensors
from adapterzoo.formats.lora.lora_metadata import output_metadata
from adapterzoo.formats.lora.lora_model import LoraFile
from adapterzoo.formats.lora.lora_write import kohya_tensors


def write_kohya(lora: LoraFile, dest: Path, provenance: dict[str, str]) -> None:
    """kohya tensors with per-module alphas, ModelSpec fields for the base, and the provenance keys; a Flux
    LoRA is named in BFL module space (split q/k/v fused back exactly), as sd-scripts writes it."""
    metadata = output_metadata(lora, "kohya", dest.stem, None)
    metadata.update(provenance)
    with atomic_output(dest) as tmp:
        tensors = flux_kohya_tensors(lora) if lora.base == "flux" else kohya_tensors(lora)
        save_file(tensors, str(tmp), metadata=metadata)
