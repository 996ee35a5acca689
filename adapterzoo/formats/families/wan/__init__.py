"""Wan 2.1 / 2.2 (Alibaba's video DiTs: T2V and I2V 14B, T2V 1.3B, FLF2V 14B; 2.2's T2V and I2V A14B as high- and
low-noise experts of the 14B's shapes, TI2V 5B): `WanTransformer3DModel` in diffusers, a umT5 text encoder, its own
VAE (2.2's 5B a 48-channel one).

`probe` recognises its files, `modules` its module table and Wan's own names for it (nothing fused),
`checkpoint` converts original/ComfyUI single files <-> diffusers folders and locates merge targets. LoRAs are
written as diffusers/PEFT (canonical), kohya (musubi-tuner's `lora_unet_blocks_0_self_attn_q`, Wan's names, alpha
kept) and comfy (`diffusion_model.blocks.0.self_attn.q.lora_A/B`, alpha folded), which diffusers' Wan loader reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterzoo.formats.families.wan import probe
from adapterzoo.formats.families.wan.modules import BASE
from adapterzoo.formats.lora.comfy_keys import comfy_dialect
from adapterzoo.formats.model.family import Family, layout_checkpoints

CHECKPOINT = "adapterzoo.formats.families.wan.checkpoint"  # its layout (`LAYOUT`) converts and locates

if TYPE_CHECKING:
    import torch

    from adapterzoo.formats.lora.lora_model import LoraFile
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture

PIPELINES = ("Wan", "SkyReelsV2")  # WanPipeline, WanImageToVideoPipeline, WanVACEPipeline, ...


def _architecture(base: str, variant: str | None) -> Architecture:
    from adapterzoo.formats.families.wan.modules import builtin_architecture

    return builtin_architecture(variant)


def _architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    from adapterzoo.formats.families.wan.modules import architecture_from_table
    from adapterzoo.formats.model.targets import TRANSFORMER

    return architecture_from_table(tables[TRANSFORMER])


def _named(lora: LoraFile, dialect: str) -> list:
    """(Wan's name, module) of every module of a Wan LoRA."""
    from adapterzoo.errors import AdapterzooError
    from adapterzoo.formats.families.wan.modules import wan_name
    from adapterzoo.formats.lora.layout_write import transformer_only

    if lora.architecture.base != BASE:
        raise AdapterzooError(f"Wan's {dialect} names are for Wan LoRAs; this one is for {lora.base}")
    transformer_only(lora, dialect)
    targets = lora.architecture.targets
    return [(wan_name(targets[path].module_path), module) for path, module in lora.modules.items()]


def _kohya(lora: LoraFile) -> dict[str, torch.Tensor]:
    """musubi-tuner's `lora_unet_<Wan name flattened>` with per-module alpha (LyCORIS modules as kohya's parts)."""
    from adapterzoo.formats.lora.layout_write import kohya_named_tensors
    from adapterzoo.formats.model.targets import flatten

    return kohya_named_tensors(_named(lora, "kohya"), lambda name: f"lora_unet_{flatten(name)}")


def _comfy(lora: LoraFile) -> dict[str, torch.Tensor]:
    """`diffusion_model.<Wan name>.lora_A/B.weight`, alpha folded (what ComfyUI and diffusers' Wan loader read)."""
    from adapterzoo.formats.lora.layout_write import folded_tensors
    from adapterzoo.formats.lora.spellings import COMFY_PREFIX

    return folded_tensors(_named(lora, "comfy"), COMFY_PREFIX, "comfy")



FAMILY = Family(
    name="wan",
    title="Wan",
    bases=(BASE,),
    order=7,  # its `diffusion_model.blocks` LoRAs before Flux.1's catch-all BFL dialect; claims only its own names
    lora_base=probe.lora_base,
    metadata_base=probe.metadata_base,
    describe_lora=probe.describe_lora,
    unconfirmed_members=("expert",),  # 2.2's high-/low-noise expert: the same tensors, told by names only
    dialects=(comfy_dialect(probe.OWN),),
    probe_checkpoint=probe.probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline.startswith(PIPELINES) else None,
    describe_folder=probe.describe_folder,
    architecture=_architecture,
    architecture_from_tables=_architecture_from_tables,
    lora_writers={"kohya": _kohya, "comfy": _comfy},
    modelspec_architecture=lambda architecture, metadata: "Wan",
    checkpoints=layout_checkpoints(BASE, probe.checkpoint_prefix, CHECKPOINT, "targets"),
    civitai_base_models={BASE: ("Wan Video", "Wan Video 14B t2v", "Wan Video 14B i2v 480p", "Wan Video 14B i2v 720p",
                                "Wan Video 1.3B t2v", "Wan Video 2.2 TI2V-5B", "Wan Video 2.2 T2V-A14B",
                                "Wan Video 2.2 I2V-A14B")},
    civitai_details={"Wan Video 14B t2v": {"size": "14b"}, "Wan Video 14B i2v 480p": {"size": "14b"},
                     "Wan Video 14B i2v 720p": {"size": "14b"}, "Wan Video 1.3B t2v": {"size": "1.3b"},
                     "Wan Video 2.2 TI2V-5B": {"size": "5b"}, "Wan Video 2.2 T2V-A14B": {"size": "14b"},
                     "Wan Video 2.2 I2V-A14B": {"size": "14b"}},  # a label the file's width contradicts is a warning
    hub_hints=(("wan2.1", BASE), ("wan2.2", BASE), ("wan2_1", BASE), ("wan2_2", BASE)),
)
