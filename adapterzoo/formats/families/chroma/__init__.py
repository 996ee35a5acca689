"""Chroma (Chroma1-HD, -Base, -Flash; lodestones): FLUX.1-schnell without the per-block modulation, which one
approximator MLP computes instead; T5-XXL only. Never mistaken for Flux.1 or the other way round: their
checkpoints differ in what each has, and a LoRA whose modules both have is claimed by Flux.1 and fits here too.

`probe` recognises its files, `modules` its module table and BFL layout (Flux.1's, from `families.flux`, whose
BFL writers it uses), `checkpoint` converts BFL single files <-> diffusers folders and locates merge targets,
`sampling` renders it for verify and sample as ChromaPipeline does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterzoo.formats.families.chroma import probe
from adapterzoo.formats.families.chroma.modules import BASE, CHROMA_CLASS
from adapterzoo.formats.model.family import Family, Sampling, layout_checkpoints, lazy

FLUX_WRITE = "adapterzoo.formats.families.flux.lora_write"
FLUX_SAMPLING = "adapterzoo.formats.families.flux.sampling"
SAMPLING = f"{__name__}.sampling"
CHECKPOINT = "adapterzoo.formats.families.chroma.checkpoint"  # its layout (`LAYOUT`) converts and locates

if TYPE_CHECKING:
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture

PIPELINES = ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")


def _architecture(base: str, variant: str | None) -> Architecture:
    from adapterzoo.formats.families.chroma.modules import builtin_architecture

    return builtin_architecture()


def _architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    from adapterzoo.formats.families.chroma.modules import architecture_from_table
    from adapterzoo.formats.model.targets import TRANSFORMER

    return architecture_from_table(tables[TRANSFORMER])



FAMILY = Family(
    name="chroma",
    title="Chroma",
    bases=(BASE,),
    order=6,  # Flux.1's block names: asked before Flux.1, claims only what has Chroma's approximator
    lora_base=probe.lora_base,
    lora_fits=probe.lora_fits,
    metadata_base=probe.metadata_base,
    describe_lora=probe.describe_lora,
    probe_checkpoint=probe.probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline in PIPELINES else None,
    architecture=_architecture,
    architecture_from_tables=_architecture_from_tables,
    lora_writers={"kohya": lazy(FLUX_WRITE, "kohya_tensors"), "bfl": lazy(FLUX_WRITE, "bfl_tensors"),
                  "comfy": lazy(FLUX_WRITE, "bfl_tensors")},  # Flux.1's BFL writers: same names, own layout
    modelspec_architecture=lambda architecture, metadata: BASE,
    checkpoints=layout_checkpoints(BASE, probe.checkpoint_prefix, CHECKPOINT),
    civitai_base_models={BASE: ("Chroma",)},
    hub_hints=(("chroma", BASE),),
    sampling=Sampling(
        bases=(BASE,),
        parts={"transformer": ("diffusers", CHROMA_CLASS), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "T5EncoderModel"), "tokenizer": ("transformers", "T5TokenizerFast"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")},
        vae_config={"scaling_factor": 0.3611, "shift_factor": 0.1159, "sample_size": 1024},  # Flux.1's ae.safetensors
        scheduler=lazy(SAMPLING, "scheduler"),
        transformer_from_file=lazy(SAMPLING, "transformer_from_file"),
        assemble=lazy(SAMPLING, "assemble"),
        flow_sigmas=lazy(FLUX_SAMPLING, "flow_sigmas"),  # ChromaPipeline's are FluxPipeline's
        embedding_slots={"t5xxl": "text_encoder"},  # Chroma's one text encoder is T5
    ),
)
