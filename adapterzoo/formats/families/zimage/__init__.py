"""Z-Image (Tongyi-MAI; Turbo and Base, one architecture): a 6B single-stream NextDiT with a Qwen3 text encoder
and Flux.1's VAE. Turbo and Base weights have the same names and shapes, so the variant is a metadata hint.

`probe` recognises its files, `modules` its module table and ComfyUI's layout (fused attention.qkv),
`checkpoint` converts ComfyUI single files <-> diffusers folders and locates merge targets. LoRAs are written
as diffusers/PEFT (canonical), kohya (musubi-tuner's `lora_unet_layers_0_attention_to_q`) and comfy
(`diffusion_model.layers.0.attention.qkv`, fused; alpha folded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterzoo.formats.families.zimage import probe
from adapterzoo.formats.families.zimage.modules import BASE, ZIMAGE_CLASS
from adapterzoo.formats.model.family import Family, Sampling, layout_checkpoints, lazy

CHECKPOINT = "adapterzoo.formats.families.zimage.checkpoint"  # its layout (`LAYOUT`) converts and locates

if TYPE_CHECKING:
    import torch

    from adapterzoo.formats.lora.lora_model import LoraFile
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture

PIPELINES = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageOmniPipeline",
             "ZImageControlNetPipeline", "ZImageControlNetInpaintPipeline")


def _architecture(base: str, variant: str | None) -> Architecture:
    from adapterzoo.formats.families.zimage.modules import builtin_architecture

    return builtin_architecture()


def _architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    from adapterzoo.formats.families.zimage.modules import architecture_from_table
    from adapterzoo.formats.model.targets import TRANSFORMER

    return architecture_from_table(tables[TRANSFORMER])


def _comfy(lora: LoraFile) -> dict[str, torch.Tensor]:
    """`diffusion_model.<ComfyUI name>.lora_A/B.weight`: q, k, v fused into attention.qkv exactly, alpha folded."""
    from adapterzoo.errors import AdapterzooError
    from adapterzoo.formats.families.zimage.modules import ZImageArchitecture
    from adapterzoo.formats.lora.layout_write import folded_tensors, layout_modules, transformer_only
    from adapterzoo.formats.lora.spellings import COMFY_PREFIX

    if not isinstance(lora.architecture, ZImageArchitecture):
        raise AdapterzooError(f"Z-Image's ComfyUI names are for Z-Image LoRAs; this one is for {lora.base}")
    transformer_only(lora, "comfy")
    layout = lora.architecture.comfy + _unrenamed(lora)
    return folded_tensors(layout_modules(lora, layout, "ComfyUI"), COMFY_PREFIX, "comfy")


def _unrenamed(lora: LoraFile) -> tuple:
    """The targets ComfyUI names as diffusers does (feed_forward.w1, adaLN_modulation.0, ...), as layout Linears."""
    from adapterzoo.formats.model.layouts import layout_module

    placed = {path for module in lora.architecture.comfy for path, _ in module.parts}
    targets = lora.architecture.targets
    return tuple(layout_module(targets, targets[path].module_path, [path]) for path in lora.modules if path not in placed)



FAMILY = Family(
    name="zimage",
    title="Z-Image",
    bases=(BASE,),
    order=30,  # NextDiT names shared with Lumina 2: claims only Z-Image's names or its real shapes
    lora_base=probe.lora_base,
    metadata_base=probe.metadata_base,
    describe_lora=probe.describe_lora,
    unconfirmed_members=("variant",),  # turbo or base: the same tensors, told by names only
    probe_checkpoint=probe.probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline in PIPELINES else None,
    describe_folder=probe.describe_folder,
    architecture=_architecture,
    architecture_from_tables=_architecture_from_tables,
    lora_writers={"comfy": _comfy},
    modelspec_architecture=lambda architecture, metadata: "Z-Image",
    checkpoints=layout_checkpoints(BASE, probe.checkpoint_prefix, CHECKPOINT),
    civitai_base_models={BASE: ("ZImageTurbo", "ZImageBase")},
    hub_hints=(("z-image", BASE), ("z_image", BASE)),
    sampling=Sampling(
        bases=(BASE,),
        parts={"transformer": ("diffusers", ZIMAGE_CLASS), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "Qwen3Model"), "tokenizer": ("transformers", "Qwen2Tokenizer"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")},
        vae_config={"scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024},  # Flux.1's VAE
        scheduler=lazy(f"{__name__}.sampling", "scheduler"),
        transformer_from_file=lazy(f"{__name__}.sampling", "transformer_from_file"),
        assemble=lazy(f"{__name__}.sampling", "assemble"),
        flow_sigmas=lazy(f"{__name__}.sampling", "flow_sigmas"),
        embedding_slots={},  # no textual-inversion format reads Qwen3
    ),
)
