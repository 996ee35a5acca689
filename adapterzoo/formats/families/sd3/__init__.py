"""Stable Diffusion 3 Medium (`sd3`) and 3.5 Large, Large Turbo and Medium (`sd35`): MMDiTs with CLIP-L, CLIP-G
and T5-XXL text encoders and a 16-channel VAE.

`probe` recognises their files and settles which release (SD3 vs SD3.5, Large vs Medium: q/k norms, width,
MMDiT-X's second attention); `modules` holds the diffusers module tables and SAI's single-file names (fused qkv,
swapped final modulations); `lora_write` writes SAI's module space (kohya, comfy); `checkpoint` locates each
target's weight in SAI single files and diffusers folders for merge and extract.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adapterzoo.formats.families.sd3 import probe
from adapterzoo.formats.lora.lora_parts import KOHYA_SUFFIXES, PEFT_SUFFIXES, split_suffix
from adapterzoo.formats.model.family import Checkpoints, Dialect, Family, Sampling, lazy

if TYPE_CHECKING:
    import torch

    from adapterzoo.formats.io.tensor_source import TensorSource
    from adapterzoo.formats.lora.lora_model import LoraFile
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture
    from adapterzoo.formats.model.weight_locations import CheckpointTargets

# ModelSpec ids of each release, as sd-scripts writes them (`stable-diffusion-3-` + its model type).
SD3_MODELSPEC = "stable-diffusion-3-medium"
SD35_MODELSPEC = {probe.LARGE: "stable-diffusion-3-5-large", probe.TURBO: "stable-diffusion-3-5-large",
                  probe.MEDIUM: "stable-diffusion-3-5-medium", None: "stable-diffusion-3-5"}


def _architecture(base: str, variant: str | None = None) -> Architecture:
    """A release's real-size targets: SD3.5 Large's unless `variant` says Medium."""
    from adapterzoo.formats.families.sd3.modules import builtin_architecture

    return builtin_architecture(base, variant)


def _architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    from adapterzoo.formats.families.sd3.modules import architecture_from_tables

    return architecture_from_tables(base, tables)


def _kohya(lora: LoraFile) -> dict[str, torch.Tensor]:
    from adapterzoo.formats.families.sd3.lora_write import kohya_tensors

    return kohya_tensors(lora)


def _comfy(lora: LoraFile) -> dict[str, torch.Tensor]:
    from adapterzoo.formats.families.sd3.lora_write import comfy_tensors

    return comfy_tensors(lora)


def _modelspec_architecture(architecture: Architecture, metadata: dict[str, str]) -> str:
    """The release the LoRA was read against (its variant), as sd-scripts names it; a file's own id is kept."""
    current = metadata.get("modelspec.architecture", "").split("/")[0]
    if architecture.base == probe.SD3:
        return current if current.startswith(SD3_MODELSPEC) else SD3_MODELSPEC
    return current if current.startswith("stable-diffusion-3-5") else SD35_MODELSPEC[getattr(architecture, "variant", None)]


def _owns_folder(folder: Path) -> bool:
    from adapterzoo.formats.families.sd3.checkpoint import transformer_folder

    return transformer_folder(folder) is not None


def _folder_base(folder: Path) -> str:
    from adapterzoo.formats.families.sd3.checkpoint import folder_base

    return folder_base(folder)


def _targets(path: Path, source: TensorSource | None) -> CheckpointTargets | None:
    from adapterzoo.formats.families.sd3.checkpoint import sd3_targets

    return sd3_targets(path, source)


FAMILY = Family(
    name="sd3",
    title="SD3/SD3.5",
    bases=(probe.SD3, probe.SD35),
    order=5,  # its `diffusion_model.joint_blocks` LoRAs before Flux's catch-all `diffusion_model.` (bfl) dialect
    lora_base=probe.lora_base,
    metadata_base=probe.metadata_base,
    describe_lora=probe.describe_lora,
    dialects=(Dialect("comfy", probe.speaks_comfy, lambda key: split_suffix(key, PEFT_SUFFIXES + KOHYA_SUFFIXES)),),
    probe_checkpoint=probe.probe_checkpoint,
    pipeline_base=probe.pipeline_base,
    vae_latents={16: probe.SD3},
    embedding_base=probe.embedding_base,
    architecture=_architecture,
    architecture_from_tables=_architecture_from_tables,
    lora_writers={"kohya": _kohya, "comfy": _comfy},
    modelspec_architecture=_modelspec_architecture,
    checkpoints=Checkpoints(file_base=probe.file_base, owns_folder=_owns_folder, folder_base=_folder_base,
                            targets=_targets),
    civitai_base_models={probe.SD3: ("SD 3",),
                         probe.SD35: ("SD 3.5", "SD 3.5 Large", "SD 3.5 Large Turbo", "SD 3.5 Medium")},
    civitai_details={"SD 3.5 Large": {"variant": probe.LARGE}, "SD 3.5 Large Turbo": {"variant": probe.TURBO},
                     "SD 3.5 Medium": {"variant": probe.MEDIUM}},
    hub_hints=(("stable-diffusion-3.5", probe.SD35), ("stable-diffusion-3", probe.SD3)),
    sampling=Sampling(
        bases=(probe.SD3, probe.SD35),
        parts={"transformer": ("diffusers", "SD3Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
               "tokenizer": ("transformers", "CLIPTokenizer"),
               "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
               "tokenizer_2": ("transformers", "CLIPTokenizer"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")},
        optional={"text_encoder_3": ("transformers", "T5EncoderModel"),
                  "tokenizer_3": ("transformers", "T5TokenizerFast")},
        part_widths={"text_encoder": 768, "text_encoder_2": 1280},  # CLIP-L and CLIP-G, both with a projection
        vae_config={"scaling_factor": 1.5305, "shift_factor": 0.0609, "sample_size": 1024},  # no VAE file says them
        scheduler=lazy(f"{__name__}.sampling", "scheduler"),
        transformer_from_file=lazy(f"{__name__}.sampling", "transformer_from_file"),
        assemble=lazy(f"{__name__}.sampling", "assemble"),
        embedding_slots={"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
    ),
)
