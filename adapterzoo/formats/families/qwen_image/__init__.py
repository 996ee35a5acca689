"""Qwen-Image (Alibaba's 20B MMDiT; Qwen-Image, Qwen-Image-Edit 2509/2511, Layered): 60 dual-stream blocks 3072
wide, a Qwen2.5-VL text encoder and its own 16-channel VAE.

`probe` recognises its files, `modules` its module table, `checkpoint` converts ComfyUI single files <-> diffusers
folders and locates merge targets, `sampling` renders Qwen-Image for verify and sample as QwenImagePipeline does. Every name is diffusers' own (ComfyUI's too), so LoRAs are written as
diffusers/PEFT (canonical), kohya (musubi-tuner's `lora_unet_transformer_blocks_0_attn_to_q`) and comfy
(`diffusion_model.transformer_blocks.0.attn.to_q`, alpha folded) without fusing anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterzoo.formats.families.qwen_image import probe
from adapterzoo.formats.families.qwen_image.modules import BASE, QWEN_CLASS
from adapterzoo.formats.lora.comfy_keys import comfy_dialect
from adapterzoo.formats.model.family import Family, Sampling, layout_checkpoints, lazy

CHECKPOINT = "adapterzoo.formats.families.qwen_image.checkpoint"  # its layout (`LAYOUT`) converts and locates
SAMPLING = f"{__name__}.sampling"

if TYPE_CHECKING:
    import torch

    from adapterzoo.formats.lora.lora_model import LoraFile
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture

PIPELINES = ("QwenImage",)  # QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline, ...


def _architecture(base: str, variant: str | None) -> Architecture:
    from adapterzoo.formats.families.qwen_image.modules import builtin_architecture

    return builtin_architecture()


def _architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    from adapterzoo.formats.families.qwen_image.modules import architecture_from_table
    from adapterzoo.formats.model.targets import TRANSFORMER

    return architecture_from_table(tables[TRANSFORMER])


def _comfy(lora: LoraFile) -> dict[str, torch.Tensor]:
    """`diffusion_model.<diffusers name>.lora_A/B.weight`, alpha folded (ComfyUI names the modules as diffusers)."""
    from adapterzoo.errors import AdapterzooError
    from adapterzoo.formats.lora.layout_write import folded_tensors, layout_modules, transformer_only
    from adapterzoo.formats.lora.spellings import COMFY_PREFIX
    from adapterzoo.formats.model.layouts import layout_module

    if lora.architecture.base != BASE:
        raise AdapterzooError(f"Qwen-Image's ComfyUI names are for Qwen-Image LoRAs; this one is for {lora.base}")
    transformer_only(lora, "comfy")
    targets = lora.architecture.targets
    layout = [layout_module(targets, targets[path].module_path, [path]) for path in lora.modules]
    return folded_tensors(layout_modules(lora, layout, "ComfyUI"), COMFY_PREFIX, "comfy")



FAMILY = Family(
    name="qwen_image",
    title="Qwen-Image",
    bases=(BASE,),
    order=7,  # diffusers MMDiT names like Flux.1's and HunyuanVideo's: asked first, claims only its own names or blocks
    lora_base=probe.lora_base,
    lora_fits=probe.lora_fits,
    metadata_base=probe.metadata_base,
    describe_lora=probe.describe_lora,
    dialects=(comfy_dialect(probe.OWN),),
    probe_checkpoint=probe.probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline.startswith(PIPELINES) else None,
    describe_folder=probe.describe_folder,
    architecture=_architecture,
    architecture_from_tables=_architecture_from_tables,
    lora_writers={"comfy": _comfy},
    modelspec_architecture=lambda architecture, metadata: "Qwen-Image",
    checkpoints=layout_checkpoints(BASE, probe.checkpoint_prefix, CHECKPOINT),
    civitai_base_models={BASE: ("Qwen",)},
    hub_hints=(("qwen-image", BASE), ("qwen_image", BASE), ("qwenimage", BASE)),
    sampling=Sampling(
        bases=(BASE,),
        parts={"transformer": ("diffusers", QWEN_CLASS), "vae": ("diffusers", "AutoencoderKLQwenImage"),
               "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
               "tokenizer": ("transformers", "Qwen2Tokenizer"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")},
        scheduler=lazy(SAMPLING, "scheduler"),
        transformer_from_file=lazy(SAMPLING, "transformer_from_file"),
        assemble=lazy(SAMPLING, "assemble"),
        flow_sigmas=lazy(SAMPLING, "flow_sigmas"),
        embedding_slots={},  # no textual-inversion format reads Qwen2.5-VL
    ),
)
