"""Lumina-Image 2.0 (and finetunes such as Neta Lumina): a 2.6B NextDiT (`Lumina2Transformer2DModel`), 26 layers
2304 wide with Gemma-2 captions. Recognised from a header; LoRAs are not read yet.

Alpha-VLLM's single files (ComfyUI's under `model.diffusion_model.`) fuse q, k and v (`layers.N.attention.qkv`,
2304 + 768 + 768 rows: 8 key/value heads for 24 query heads) and name the MLP `feed_forward.w1/w2/w3`;
diffusers splits them (`layers.N.attn.to_q`, `feed_forward.linear_1`). Z-Image is a NextDiT with the same
single-file names: Lumina 2 is the one 2304 wide, with its modulation at `adaLN_modulation.1` (Z-Image's `.0`).
"""

from __future__ import annotations

import re

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.comfy_keys import comfy_dialect
from adapterzoo.formats.lora.lora_parts import module_dims
from adapterzoo.formats.model.block_names import bare, block_numbers, prefix_of
from adapterzoo.formats.model.family import Family

BASE = "lumina2"
WIDTH = 2304
_BLOCKS = re.compile(r"^(?:layers|noise_refiner|context_refiner)[._]\d+[._]")
_ATTENTION = re.compile(r"^(?:layers|noise_refiner|context_refiner)[._]\d+[._](?:attention[._]qkv|attn[._]to_q)$")


def _width(modules: dict[str, dict[str, str]], table: TensorTable) -> int | None:
    for name, parts in modules.items():
        if _ATTENTION.match(bare(name)) and (dims := module_dims(parts, table)):
            return dims[1]
    return None


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """NextDiT blocks (single-file or diffusers names) exactly Lumina 2 wide."""
    if not any(_BLOCKS.match(bare(name)) for name in modules):
        return None
    return BASE if _width(modules, table) == WIDTH else None


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    names = [bare(n) for n in modules]
    result.details["coverage"] = {
        "layers": block_numbers(names, "layers"), "noise_refiner": block_numbers(names, "noise_refiner"),
        "context_refiner": block_numbers(names, "context_refiner"), "text_encoders": [],
        "other_modules": sum(1 for n in names if not _BLOCKS.match(n))}


def metadata_base(metadata: dict[str, str]) -> str | None:
    """sd-scripts' ModelSpec id `lumina-2` (its lumina_train_network)."""
    said = (metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")).lower()
    return BASE if "lumina" in said else None


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """A single file (`cap_embedder`, `adaLN_modulation.1`) or a diffusers transformer (`time_caption_embed`)."""
    original = prefix_of(table, "layers.0.adaLN_modulation.1.weight")
    if original is not None and original + "cap_embedder.1.weight" in table:
        result.format, caption = "ldm", table[original + "cap_embedder.1.weight"]
        names = [k[len(original):] for k in table if k.startswith(original)]
    elif "time_caption_embed.caption_embedder.1.weight" in table and "layers.0.norm1.linear.weight" in table:
        result.format, caption, names = "diffusers", table["time_caption_embed.caption_embedder.1.weight"], list(table)
    else:
        return False
    result.kind, result.base = "checkpoint", BASE
    result.details |= {"width": caption.shape[0], "caption_width": caption.shape[1],
                       "layers": len(block_numbers(names, "layers")), "components": ["transformer"]}
    if caption.shape[0] != WIDTH:
        result.warnings.append(f"a NextDiT {caption.shape[0]} wide, not Lumina 2's {WIDTH}: read as Lumina 2 by its "
                               "names")
    return True


FAMILY = Family(
    name="lumina2",
    title="Lumina 2",
    bases=(BASE,),
    order=9,  # its `diffusion_model.` LoRAs before Flux.1's catch-all BFL dialect; claims only Lumina 2's width
    lora_base=lora_base,
    metadata_base=metadata_base,
    describe_lora=describe_lora,
    dialects=(comfy_dialect(_BLOCKS),),
    probe_checkpoint=probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline.startswith("Lumina2") else None,
    civitai_base_models={BASE: ("Lumina",)},
    hub_hints=(("lumina-image-2", BASE),),
)
