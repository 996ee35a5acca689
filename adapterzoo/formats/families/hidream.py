"""HiDream-I1 (Full, Dev, Fast) and E1: a 17B sparse-MoE DiT (`HiDreamImageTransformer2DModel`), 16 double- and
32 single-stream blocks 2560 wide. Recognised from a header; LoRAs are not read yet.

Its single files use diffusers' own names (`double_stream_blocks.N.block.attn1.to_q`, `ff_i.experts.N.w1`),
bare or under ComfyUI's `model.diffusion_model.`; its LoRAs are those names under `transformer.` (diffusers),
`diffusion_model.` (ComfyUI) or flattened after `lora_unet_`. Full, Dev and Fast have the same tensors.
"""

from __future__ import annotations

import re

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.comfy_keys import comfy_dialect
from adapterzoo.formats.model.block_names import bare, block_numbers, prefix_of
from adapterzoo.formats.model.family import Family

BASE = "hidream"
MARKER = "double_stream_blocks.0.block.attn1.to_q.weight"
_BLOCKS = re.compile(r"^(?:double|single)_stream_blocks[._]\d+[._]")


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    return BASE if any(_BLOCKS.match(bare(name)) for name in modules) else None


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    names = [bare(n) for n in modules]
    result.details["coverage"] = {
        "double_stream_blocks": block_numbers(names, "double_stream_blocks"),
        "single_stream_blocks": block_numbers(names, "single_stream_blocks"),
        "experts": any(re.search(r"experts[._]\d+[._]w[123]", n) for n in names),
        "text_encoders": [], "other_modules": sum(1 for n in names if not _BLOCKS.match(n))}


def metadata_base(metadata: dict[str, str]) -> str | None:
    said = (metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")).lower()
    return BASE if "hidream" in said else None


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    prefix = prefix_of(table, MARKER)
    if prefix is None:
        return False
    names = [k[len(prefix):] for k in table if k.startswith(prefix)]
    result.kind, result.base = "checkpoint", BASE
    result.format = "ldm" if prefix else "diffusers"
    experts = {int(m[1]) for n in names if (m := re.match(r"double_stream_blocks\.0\.block\.ff_i\.experts\.(\d+)\.", n))}
    result.details |= {"width": table[prefix + MARKER].shape[1],
                       "double_stream_blocks": len(block_numbers(names, "double_stream_blocks")),
                       "single_stream_blocks": len(block_numbers(names, "single_stream_blocks")),
                       "experts": len(experts), "components": ["transformer"]}
    return True


FAMILY = Family(
    name="hidream",
    title="HiDream",
    bases=(BASE,),
    order=7,  # its `diffusion_model.` LoRAs before Flux.1's catch-all BFL dialect; claims only its own names
    lora_base=lora_base,
    metadata_base=metadata_base,
    describe_lora=describe_lora,
    dialects=(comfy_dialect(_BLOCKS),),
    probe_checkpoint=probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline.startswith("HiDream") else None,
    civitai_base_models={BASE: ("HiDream",)},
    hub_hints=(("hidream", BASE),),
)
