"""The `__metadata__` a converted LoRA carries: the source's training notes, ModelSpec fixed for the output.

`ss_*` / `ssmd_*` / `modelspec.*` travel; what described the old bytes (embedded hashes, diffusers'
adapter config, cloneofsimo's injection lists) does not. ModelSpec's architecture (the base's family
names it) and implementation are set for the output (FORMATS.md §6).
"""

from __future__ import annotations

from adapterzoo.formats.lora.lora_model import LoraFile
from adapterzoo.formats.model.registry import family_of

IMPL_DIFFUSERS = "diffusers"
IMPL_STABILITY = "https://github.com/Stability-AI/generative-models"
_STALE = ("format", "lora_adapter_metadata", "modelspec.hash_sha256")
_CLONEOFSIMO_KEYS = ("unet", "text_encoder")


def _carried(lora: LoraFile) -> dict[str, str]:
    out = {}
    for key, value in lora.metadata.items():
        if key in _STALE or key.startswith("sshs_") or value == "<embed>":
            continue
        if lora.source_format == "cloneofsimo" and (key in _CLONEOFSIMO_KEYS or key.endswith(":rank")):
            continue
        out[key] = value
    return out


def output_metadata(lora: LoraFile, to: str, title: str, approximated_rank: int | None) -> dict[str, str]:
    """Metadata for the converted file; `approximated_rank` when LyCORIS modules became rank-N LoRAs."""
    metadata = _carried(lora)
    if approximated_rank is not None:  # the nominal kohya fields now describe a plain rank-N LoRA
        metadata.pop("ss_network_args", None)
        nominal = {"ss_network_module": "networks.lora", "ss_network_dim": str(approximated_rank),
                   "ss_network_alpha": str(approximated_rank)}
        metadata.update({k: v for k, v in nominal.items() if k in metadata})
    kohya_ldm = to == "kohya" and lora.architecture.convention.unet_naming == "ldm"
    metadata.setdefault("modelspec.sai_model_spec", "1.0.0")
    metadata.setdefault("modelspec.title", title)
    family = family_of(lora.base)
    if family is not None and family.modelspec_architecture is not None:
        metadata["modelspec.architecture"] = f"{family.modelspec_architecture(lora.architecture, metadata)}/lora"
    metadata["modelspec.implementation"] = IMPL_STABILITY if kohya_ldm else IMPL_DIFFUSERS
    return metadata
