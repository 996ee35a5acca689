"""Flux.1 (dev, schnell, Fill, Depth, Krea, Kontext): a 12B MMDiT with CLIP-L and T5-XXL (FLUX.md).

`probe` recognises its files and its own LoRA dialects (BFL/ComfyUI names, XLabs slots); `modules` holds
the diffusers module table and BFL's fused projections (fused <-> split rows); `lora_write` writes the BFL
module space (kohya, bfl); `checkpoint` converts BFL single files <-> diffusers folders and locates targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adapterzoo.formats.families.flux import probe
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.lora_parts import KOHYA_SUFFIXES, PEFT_SUFFIXES, split_suffix
from adapterzoo.formats.model.family import Checkpoints, Dialect, Family, Sampling, lazy

if TYPE_CHECKING:
    import torch

    from adapterzoo.formats.io.safetensors_writer import PlannedTensor
    from adapterzoo.formats.io.tensor_source import TensorSource
    from adapterzoo.formats.lora.lora_model import LoraFile
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture
    from adapterzoo.formats.model.weight_locations import CheckpointTargets

MODELSPEC = ("flux-1", "flux-1-dev")  # (prefix of every Flux.1 ModelSpec id, the default)


def _architecture(base: str, variant: str | None) -> Architecture:
    from adapterzoo.formats.families.flux.modules import flux_architecture

    return flux_architecture()


def _architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    from adapterzoo.formats.families.flux.modules import flux_architecture_from_tables

    return flux_architecture_from_tables(tables)


def _kohya(lora: LoraFile) -> dict[str, torch.Tensor]:
    from adapterzoo.formats.families.flux.lora_write import kohya_tensors

    return kohya_tensors(lora)


def _bfl(lora: LoraFile) -> dict[str, torch.Tensor]:
    from adapterzoo.formats.families.flux.lora_write import bfl_tensors

    return bfl_tensors(lora)


def _modelspec_architecture(architecture: Architecture, metadata: dict[str, str]) -> str:
    current = metadata.get("modelspec.architecture", "").split("/")[0]
    return current if current.startswith(MODELSPEC[0]) else MODELSPEC[1]


def _file_base(table: TensorTable) -> str | None:
    return probe.BASE if probe.bfl_prefix(table) is not None else None


def _owns_folder(folder: Path) -> bool:
    from adapterzoo.formats.families.flux.checkpoint import flux_transformer_folder

    return flux_transformer_folder(folder) is not None


def _to_single_file(folder: Path, dtype: torch.dtype | None) -> tuple[str, list[PlannedTensor], list[str]]:
    from adapterzoo.formats.families.flux.checkpoint import to_single_file

    return to_single_file(folder, dtype)


def _to_folder(source: TensorSource, dtype: torch.dtype | None, folder: Path) -> dict:
    from adapterzoo.formats.families.flux.checkpoint import to_folder

    return to_folder(source, dtype, folder)


def _targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    from adapterzoo.formats.families.flux.checkpoint import flux_targets

    return flux_targets(path, source)


FAMILY = Family(
    name="flux",
    title="Flux",
    bases=(probe.BASE,),
    order=10,  # BFL and diffusers MMDiT names: before the families whose names they overlap
    lora_base=probe.lora_base,
    metadata_base=probe.metadata_base,
    describe_lora=probe.describe_lora,
    dialects=(
        Dialect("xlabs", probe.speaks_xlabs, probe.split_xlabs),
        Dialect("bfl", probe.speaks_bfl, lambda key: split_suffix(key, PEFT_SUFFIXES + KOHYA_SUFFIXES)),
    ),
    probe_checkpoint=probe.probe_checkpoint,
    pipeline_base=lambda pipeline, config: probe.BASE if pipeline == "FluxPipeline" else None,
    embedding_base=probe.embedding_base,
    architecture=_architecture,
    architecture_from_tables=_architecture_from_tables,
    lora_writers={"kohya": _kohya, "bfl": _bfl, "comfy": _bfl},  # ComfyUI reads BFL names natively
    lora_refusal=probe.lora_refusal,
    modelspec_architecture=_modelspec_architecture,
    checkpoints=Checkpoints(
        file_base=_file_base,
        owns_folder=_owns_folder,
        folder_base=lambda folder: probe.BASE,
        to_single_file=_to_single_file,
        to_folder=_to_folder,
        targets=_targets,
    ),
    civitai_base_models={probe.BASE: ("Flux.1 D", "Flux.1 S", "Flux.1 Krea", "Flux.1 Kontext")},
    hub_hints=((probe.BASE, probe.BASE),),
    sampling=Sampling(
        bases=(probe.BASE,),
        parts={"transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
               "text_encoder_2": ("transformers", "T5EncoderModel"), "tokenizer_2": ("transformers", "T5TokenizerFast"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")},
        vae_config={"scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024},  # ae.safetensors has none
        scheduler=lazy(f"{__name__}.sampling", "scheduler"),
        transformer_from_file=lazy(f"{__name__}.sampling", "transformer_from_file"),
        assemble=lazy(f"{__name__}.sampling", "assemble"),
        flow_sigmas=lazy(f"{__name__}.sampling", "flow_sigmas"),
        embedding_slots={"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},  # Flux's text_encoder_2 is T5
    ),
)
