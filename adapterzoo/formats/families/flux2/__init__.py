"""Flux.2 (dev 32B, Klein 9B, Klein 4B; base and distilled Kleins share their shapes): an MMDiT with BFL's block
names, a Mistral-3 or Qwen3 text encoder and a 32-channel VAE. No LoRA of one member fits another.

`probe` recognises its files and members, `modules` holds the module tables of the three releases and the BFL
layout (shared with Flux.1's naming: the BFL writers and `FluxArchitecture` come from `families.flux`),
`checkpoint` converts BFL single files <-> diffusers folders and locates merge targets, `sampling` renders the
Kleins for verify and sample as Flux2KleinPipeline does (dev is refused there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapterzoo.formats.families.flux2 import probe
from adapterzoo.formats.families.flux2.modules import BASE, DEV, FLUX2_CLASS
from adapterzoo.formats.model.family import Family, Sampling, layout_checkpoints, lazy

FLUX_WRITE = "adapterzoo.formats.families.flux.lora_write"
FLUX_SAMPLING = "adapterzoo.formats.families.flux.sampling"
SAMPLING = f"{__name__}.sampling"
CHECKPOINT = "adapterzoo.formats.families.flux2.checkpoint"  # its layout (`LAYOUT`) converts and locates

if TYPE_CHECKING:
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture

PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline")
MODELSPEC = {"dev": "Flux.2-dev", "klein-4b": "Flux.2-klein-4b", "klein-9b": "Flux.2-klein-9b"}  # musubi-tuner's ids


def _architecture(base: str, variant: str | None) -> Architecture:
    from adapterzoo.formats.families.flux2.modules import builtin_architecture

    return builtin_architecture(variant)


def _architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    from adapterzoo.formats.families.flux2.modules import architecture_from_table
    from adapterzoo.formats.model.targets import TRANSFORMER

    return architecture_from_table(tables[TRANSFORMER])


def _modelspec_architecture(architecture: Architecture, metadata: dict[str, str]) -> str:
    return MODELSPEC[architecture.variant or DEV]



FAMILY = Family(
    name="flux2",
    title="Flux.2",
    bases=(BASE,),
    order=5,  # BFL block names like Flux.1's: asked first, and claims only what Flux.1 cannot be
    lora_base=probe.lora_base,
    lora_fits=probe.lora_fits,
    metadata_base=probe.metadata_base,
    describe_lora=probe.describe_lora,
    probe_checkpoint=probe.probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline in PIPELINES else None,
    describe_folder=probe.describe_folder,
    vae_latents={32: BASE},
    architecture=_architecture,
    architecture_from_tables=_architecture_from_tables,
    lora_writers={"kohya": lazy(FLUX_WRITE, "kohya_tensors"), "bfl": lazy(FLUX_WRITE, "bfl_tensors"),
                  "comfy": lazy(FLUX_WRITE, "bfl_tensors")},  # Flux.1's BFL writers: same names, own layout
    modelspec_architecture=_modelspec_architecture,
    checkpoints=layout_checkpoints(BASE, probe.checkpoint_prefix, CHECKPOINT),
    civitai_base_models={BASE: ("Flux.2 D", "Flux.2 Klein 9B", "Flux.2 Klein 9B-base", "Flux.2 Klein 4B",
                                "Flux.2 Klein 4B-base")},
    hub_hints=(("flux.2", BASE), ("flux2", BASE)),
    sampling=Sampling(
        bases=(BASE,),
        parts={"transformer": ("diffusers", FLUX2_CLASS), "vae": ("diffusers", "AutoencoderKLFlux2"),
               "text_encoder": ("transformers", "Qwen3Model"), "tokenizer": ("transformers", "Qwen2TokenizerFast"),
               "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")},
        scheduler=lazy(SAMPLING, "scheduler"),
        transformer_from_file=lazy(SAMPLING, "transformer_from_file"),
        assemble=lazy(SAMPLING, "assemble"),
        flow_sigmas=lazy(FLUX_SAMPLING, "flow_sigmas"),  # Flux2KleinPipeline's are FluxPipeline's
        flow_mu=lazy(SAMPLING, "flow_mu"),
        refuse=lazy(SAMPLING, "refuse"),
        embedding_slots={},  # no textual-inversion format reads Qwen3
    ),
)
