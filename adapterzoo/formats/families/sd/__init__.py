"""Stable Diffusion 1.x, 2.x and XL: UNet denoisers with CLIP text encoders, LDM/SGM single files.

`probe` recognises their files, `modules` holds their module tables and kohya spellings, `targets` where a
LoRA's modules live in a checkpoint, `to_diffusers` / `to_single_file` convert their checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterzoo.formats.families.sd import probe
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.model import unet_names
from adapterzoo.formats.model.family import Checkpoints, Family, Sampling

if TYPE_CHECKING:
    import torch

    from adapterzoo.formats.io.safetensors_writer import PlannedTensor
    from adapterzoo.formats.io.tensor_source import TensorSource
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture
    from adapterzoo.formats.model.weight_locations import CheckpointTargets

SDXL_LABELS = ("SDXL 0.9", "SDXL 1.0", "SDXL 1.0 LCM", "SDXL Distilled", "SDXL Turbo", "SDXL Lightning", "SDXL Hyper")
SDXL_FAMILY_LABELS = {"Pony": "pony", "Illustrious": "illustrious", "NoobAI": "noobai"}  # Civitai's SDXL ecosystems
# base -> (ModelSpec architecture prefix every id of that base starts with, default id)
MODELSPEC = {
    "sd1": ("stable-diffusion-v1", "stable-diffusion-v1"),
    "sd2": ("stable-diffusion-v2", "stable-diffusion-v2-512"),
    "sdxl": ("stable-diffusion-xl", "stable-diffusion-xl-v1-base"),
}


def _architecture(base: str, variant: str | None) -> Architecture:
    from adapterzoo.formats.families.sd.modules import builtin_architecture

    return builtin_architecture(base)


def _architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    from adapterzoo.formats.families.sd.modules import architecture_from_tables

    return architecture_from_tables(base, tables)


def _modelspec_architecture(architecture: Architecture, metadata: dict[str, str]) -> str:
    base = architecture.base
    prefix, default = MODELSPEC[base]
    current = metadata.get("modelspec.architecture", "").split("/")[0]
    if current.startswith(prefix):
        return current
    v_model = metadata.get("ss_v_parameterization") == "True" or metadata.get("ss_base_model_version") == "sd_v2_v"
    return "stable-diffusion-v2-768-v" if base == "sd2" and v_model else default


def _file_base(table: TensorTable) -> str | None:
    """A whole LDM/SGM single file (its UNet under `model.diffusion_model.`)."""
    if not any(k.startswith(unet_names.LDM_PREFIX) for k in table):
        return None
    return probe.single_file_base(table)


def _folder_base(folder: Path) -> str:
    from adapterzoo.formats.families.sd.to_single_file import diffusers_base

    return diffusers_base(folder)


def _to_single_file(folder: Path, dtype: torch.dtype | None) -> tuple[str, list[PlannedTensor], list[str]]:
    from adapterzoo.formats.families.sd.to_single_file import diffusers_to_ldm_plan, prediction_warnings

    base, plan = diffusers_to_ldm_plan(folder, dtype)
    return base, plan, prediction_warnings(folder, base)


def _to_folder(source: TensorSource, dtype: torch.dtype | None, folder: Path) -> dict:
    from adapterzoo.formats.families.sd.to_diffusers import plan_diffusers, write_diffusers

    return write_diffusers(plan_diffusers(source, dtype), folder)


def _to_pipeline(source: TensorSource, dtype: torch.dtype) -> tuple[str, Any]:
    from adapterzoo.formats.families.sd.in_memory import pipeline_in_memory

    return pipeline_in_memory(source, dtype)


def _targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    from adapterzoo.formats.families.sd.targets import sd_targets

    return sd_targets(path, source)


FAMILY = Family(
    name="sd",
    title="Stable Diffusion 1/2/XL",
    bases=probe.BASES,
    order=90,  # recognised by widths that other families' files can share: asked last
    lora_base=probe.lora_base,
    metadata_base=probe.metadata_base,
    describe_lora=probe.describe_lora,
    probe_checkpoint=probe.probe_checkpoint,
    pipeline_base=probe.pipeline_base,
    embedding_base=probe.embedding_base,
    hypernetwork_base=probe.hypernetwork_base,
    architecture=_architecture,
    architecture_from_tables=_architecture_from_tables,
    modelspec_architecture=_modelspec_architecture,
    checkpoints=Checkpoints(
        file_base=_file_base,
        owns_folder=lambda folder: (folder / "model_index.json").is_file(),
        folder_base=_folder_base,
        to_single_file=_to_single_file,
        to_folder=_to_folder,
        to_pipeline=_to_pipeline,
        targets=_targets,
    ),
    civitai_base_models={
        "sd1": ("SD 1.4", "SD 1.5", "SD 1.5 LCM", "SD 1.5 Hyper"),
        "sd2": ("SD 2.0", "SD 2.0 768", "SD 2.1", "SD 2.1 768", "SD 2.1 Unclip"),
        "sdxl": SDXL_LABELS + tuple(SDXL_FAMILY_LABELS),  # not "Pony V7": that Pony is an AuraFlow
    },
    civitai_details={**{label: {"family": "sdxl"} for label in SDXL_LABELS},
                     **{label: {"family": family} for label, family in SDXL_FAMILY_LABELS.items()}},
    hub_hints=(("xl", "sdxl"), ("stable-diffusion-2", "sd2"), ("v2-", "sd2"), ("stable-diffusion-v1", "sd1"),
               ("v1-5", "sd1"), ("sd-1", "sd1")),
    sampling=Sampling(
        bases=probe.BASES,
        vae_fp32=("sdxl",),
        vae_fp16_black="the SDXL VAE overflows in fp16 and decodes a black image: decode in fp32 (--dtype fp32) "
                       "or use an fp16-fixed VAE (madebyollin/sdxl-vae-fp16-fix)",
    ),
)
