"""HunyuanVideo 1.0 (T2V, I2V) and 1.5: Tencent's video DiTs (`HunyuanVideoTransformer3DModel`,
`HunyuanVideo15Transformer3DModel` in diffusers). Recognised from a header; LoRAs are not read yet.

1.0 is Flux-like (20 double and 40 single blocks, 3072 wide) and its original names are Flux's with underscores
(`double_blocks.N.img_attn_qkv`, `img_mod.linear`, `img_mlp.fc1`, `single_blocks.N.modulation.linear`), plus a
token refiner in front of the text stream (`txt_in.individual_token_refiner`). 1.5 is 54 double blocks 2048
wide with a ByT5 glyph embedder (`byt5_in`) and an image embedder (`vision_in`); HunyuanImage 2.1 has `byt5_in`
but no `vision_in`, and is not this family. A LoRA naming only what Flux.1 also has (its attention, at 3072 in
blocks Flux.1 has too) reads as Flux.1: the names and shapes cannot tell them apart.
"""

from __future__ import annotations

import re

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.comfy_keys import comfy_dialect
from adapterzoo.formats.lora.lora_parts import module_dims
from adapterzoo.formats.model.block_names import bare, block_numbers, prefix_of
from adapterzoo.formats.model.family import Family

BASE = "hunyuan_video"
FLUX_DOUBLE, FLUX_SINGLE = 19, 38  # Flux.1's block counts: a higher block number is HunyuanVideo's own
I2V_CHANNELS = 33  # HunyuanVideo-I2V's packed input: latents, the image's latents and a mask
# Names only HunyuanVideo's modules have, dotted or kohya-flattened (where Flux.1's `img_attn.qkv` reads
# `img_attn_qkv` too, so only the dotted spelling of those two is its own).
_OWN = re.compile(r"(?:img|txt)_(?:attn_[qkv](?=[._]|$)|mod[._]linear|mlp[._]fc[12])|modulation[._]linear"
                  r"|individual_token_refiner|token_refiner|byt5_in|vision_in|context_embedder_2|image_embedder"
                  r"|cond_type_embed|\.(?:img|txt)_attn_(?:qkv|proj)(?:\.|$)")


def _version(names: list[str]) -> str | None:
    """1.5 by its ByT5 and image embedders, 1.0 by its CLIP pooled vector; None if neither is named."""
    if any("vision_in" in n or "image_embedder" in n or "cond_type_embed" in n for n in names):
        return "1.5"
    if any(n.startswith(("vector_in", "time_text_embed.text_embedder")) for n in names):
        return "1.0"
    return None


def _width(modules: dict[str, dict[str, str]], table: TensorTable) -> int | None:
    for name, parts in modules.items():
        if re.search(r"(img_attn_(qkv|q)|attn[._]to_q)$", name) and (dims := module_dims(parts, table)):
            return dims[1]
    return None


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """HunyuanVideo's own module names, or diffusers names in blocks past Flux.1's (at 3072, 1.0's width), or
    diffusers' double blocks 2048 wide with no single blocks (1.5)."""
    names = [bare(n) for n in modules]
    if any(_OWN.search(n) for n in names):
        return BASE
    width = _width(modules, table)
    double, single = block_numbers(names, "transformer_blocks"), block_numbers(names, "single_transformer_blocks")
    if width == 3072 and ((double and double[-1] >= FLUX_DOUBLE) or (single and single[-1] >= FLUX_SINGLE)):
        return BASE
    return BASE if width == 2048 and double and not single and any("add_q_proj" in n for n in names) else None


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    names = [bare(n) for n in modules]
    width = _width(modules, table)
    version = _version(names) or {3072: "1.0", 2048: "1.5"}.get(width)
    if version:
        result.details["version"] = version
    double = block_numbers(names, "double_blocks") or block_numbers(names, "transformer_blocks")
    single = block_numbers(names, "single_blocks") or block_numbers(names, "single_transformer_blocks")
    refiner = any("token_refiner" in n for n in names)
    result.details["coverage"] = {"double_blocks": double, "single_blocks": single, "token_refiner": refiner,
                                  "text_encoders": [], "other_modules": sum(1 for n in names if not re.match(
                                      r"(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks)"
                                      r"[._]\d", n) and "token_refiner" not in n)}


def metadata_base(metadata: dict[str, str]) -> str | None:
    """musubi-tuner's `ss_base_model_version` (hunyuan_video, hunyuan_video_1_5) or a ModelSpec id."""
    said = (metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")).lower()
    return BASE if "hunyuan_video" in said or "hunyuan-video" in said else None


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """Original single files (bare, or under ComfyUI's `model.diffusion_model.`) and diffusers transformers."""
    keys = list(table)
    original = prefix_of(table, "txt_in.individual_token_refiner.blocks.0.norm1.weight")
    if original is not None:
        names = [k[len(original):] for k in keys if k.startswith(original)]
        if "byt5_in.fc1.weight" in names and "vision_in.proj.0.weight" not in names:
            return False  # HunyuanImage 2.1: the refiner and ByT5, no image embedder
        result.format, embed = "ldm", table[f"{original}img_in.proj.weight"]
    elif "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight" in table:
        names, result.format, embed = keys, "diffusers", table["x_embedder.proj.weight"]
    else:
        return False
    result.kind, result.base = "checkpoint", BASE
    version = _version(names) or "1.0"
    result.details |= {"version": version, "width": embed.shape[0], "in_channels": embed.shape[1],
                       "double_blocks": len(block_numbers(names, "double_blocks") or block_numbers(
                           names, "transformer_blocks"))}
    if version == "1.0":
        result.details["variant"] = "i2v" if embed.shape[1] == I2V_CHANNELS else "t2v"
    result.details["components"] = ["transformer"]
    return True


FAMILY = Family(
    name="hunyuan_video",
    title="HunyuanVideo",
    bases=(BASE,),
    order=8,  # names like Flux.1's BFL ones with underscores: asked before Flux.1, claims only its own
    lora_base=lora_base,
    metadata_base=metadata_base,
    describe_lora=describe_lora,
    dialects=(comfy_dialect(_OWN),),
    probe_checkpoint=probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline.startswith(("HunyuanVideo", "HunyuanSkyreels")) else None,
    civitai_base_models={BASE: ("Hunyuan Video",)},
    hub_hints=(("hunyuanvideo", BASE),),
)
