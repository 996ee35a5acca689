"""Stable Diffusion 3 / 3.5: an MMDiT (`joint_blocks` in single files, `SD3Transformer2DModel` in diffusers) with
CLIP-L, CLIP-G and T5-XXL text encoders and a 16-channel VAE. Recognised; its LoRAs are not read yet.
"""

from __future__ import annotations

from adapterzoo.formats.checkpoint.components import single_file_components
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.model import unet_names
from adapterzoo.formats.model.family import Checkpoints, Family

BASE = "sd3"
ROOTS = (unet_names.LDM_PREFIX, "joint_blocks.")


def _lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    names = " ".join(modules)
    return BASE if "joint_blocks" in names or ("add_q_proj" in names and "transformer." in names) else None


def _is_sd3(keys: list[str]) -> bool:
    return any("joint_blocks." in k for k in keys) or (
        any("attn.add_q_proj" in k for k in keys) and any("pos_embed.proj" in k for k in keys))


def _probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    keys = list(table)
    if not _is_sd3(keys):
        return False
    result.kind, result.base = "checkpoint", BASE
    result.format = "diffusers" if any("transformer_blocks." in k for k in keys) else "ldm"
    result.details["components"] = single_file_components(keys, "transformer", ROOTS)
    return True


def _file_base(table: TensorTable) -> str | None:
    """A whole single file (rewritten by `convert --to ldm`; no diffusers layout is written)."""
    keys = list(table)
    return BASE if any(k.startswith(unet_names.LDM_PREFIX) for k in keys) and _is_sd3(keys) else None


def _embedding_base(slots: dict[str, int]) -> str | None:
    return BASE if {"t5xxl", "clip_l", "clip_g"} <= set(slots) else None


FAMILY = Family(
    name="sd3",
    title="SD3",
    bases=(BASE,),
    order=20,
    lora_base=_lora_base,
    probe_checkpoint=_probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline == "StableDiffusion3Pipeline" else None,
    vae_latents={16: BASE},
    embedding_base=_embedding_base,
    checkpoints=Checkpoints(file_base=_file_base),
    civitai_base_models={BASE: ("SD 3", "SD 3.5", "SD 3.5 Medium", "SD 3.5 Large", "SD 3.5 Large Turbo")},
    hub_hints=(("stable-diffusion-3", BASE),),
)
