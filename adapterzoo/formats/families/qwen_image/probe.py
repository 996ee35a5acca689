"""Recognise Qwen-Image files from names and shapes, plain Python on a header.

Qwen-Image is a 60-block MMDiT 3072 wide with diffusers' names everywhere (ComfyUI's too). Its own names are the
per-block modulations and MLPs (`transformer_blocks.N.img_mod.1`, `txt_mlp.net.0.proj`); its joint attention is
named as the double blocks of Flux.1 and HunyuanVideo 1.0 in diffusers, at their width, so an attention-only LoRA is
Qwen-Image's when it reaches a block past their 19 and 20, and otherwise fits them alike (`lora_fits`: metadata
decides). Qwen-Image and
its Edit models have the same tensors, so `edit` is read from metadata or a file name as a hint, with a warning.
"""

from __future__ import annotations

import re
from pathlib import Path

from adapterzoo.formats.families.qwen_image.modules import BASE
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.fitting import fits
from adapterzoo.formats.model.block_names import bare, block_numbers, prefix_of

MARKER = "transformer_blocks.0.img_mod.1.weight"  # bare key of every Qwen-Image transformer
PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
ADDITION_T = "time_text_embed.addition_t_embedding.weight"  # Qwen-Image-Layered's layer-index embedding
OTHER_DOUBLE = 20  # HunyuanVideo 1.0's double blocks (Flux.1 has 19), named and shaped as Qwen-Image's: more are ours
OWN = re.compile(r"transformer_blocks[._]\d+[._](?:img|txt)_(?:mod|mlp)[._]")
EDIT = re.compile(r"qwen[-_ ]?image[-_ ]?edit", re.IGNORECASE)
SAME_TENSORS = "Qwen-Image and Qwen-Image-Edit have the same tensor names and shapes"


def _fits(modules: dict[str, dict[str, str]], table: TensorTable) -> bool:
    from adapterzoo.formats.families.qwen_image.modules import builtin_architecture

    return fits(modules, table, builtin_architecture())


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """Qwen-Image's own names, or its real shapes in a block that Flux.1 and HunyuanVideo 1.0 do not have."""
    names = [bare(n) for n in modules]
    if any(OWN.search(n) for n in names):
        return BASE
    blocks = block_numbers(names, "transformer_blocks")
    return BASE if blocks and blocks[-1] >= OTHER_DOUBLE and _fits(modules, table) else None


def lora_fits(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """An attention-only LoRA of blocks 0-19 at 3072 fits Qwen-Image as well as Flux.1 or HunyuanVideo 1.0."""
    return BASE if _fits(modules, table) else None


def metadata_base(metadata: dict[str, str]) -> str | None:
    """musubi-tuner's `ss_base_model_version` (qwen_image, qwen_image_edit) or a ModelSpec id Qwen-Image."""
    said = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    return BASE if re.search(r"qwen[-_ ]?image", said, re.IGNORECASE) else None


def coverage(names: list[str]) -> dict:
    """Which blocks a Qwen-Image LoRA patches, and whether it reaches the image or text stream's MLP."""
    names = [bare(n) for n in names]
    return {"transformer_blocks": block_numbers(names, "transformer_blocks"),
            "mlp": any(re.search(r"(?:img|txt)_mlp", n) for n in names),
            "modulation": any(re.search(r"(?:img|txt)_mod[._]", n) for n in names), "text_encoders": [],
            "other_modules": sum(1 for n in names if not re.match(r"transformer_blocks[._]\d", n))}


def _describe_variant(result: ProbeResult, texts: dict[str, str]) -> None:
    where = next((where for where, text in texts.items() if EDIT.search(text)), None)
    if where is not None:
        result.details["variant"] = "edit"
        result.warnings.append(f"{SAME_TENSORS}: read as edit from its {where}, which the weights cannot confirm")


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    result.details["coverage"] = coverage(list(modules))
    _describe_variant(result, {f"metadata ({key})": value for key, value in result.metadata.items()})


def checkpoint_prefix(keys: dict | list) -> str | None:
    """The prefix of a Qwen-Image transformer's keys: none, ComfyUI's `model.diffusion_model.` or `diffusion_model.`."""
    return prefix_of(keys, MARKER, PREFIXES)


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """A Qwen-Image transformer (ComfyUI diffusion_models or a diffusers-named file); Layered by its extra embedding."""
    prefix = checkpoint_prefix(table)
    if prefix is None:
        return False
    names = [k[len(prefix):] for k in table if k.startswith(prefix)]
    result.kind, result.base = "checkpoint", BASE
    result.format = "ldm" if prefix else "diffusers"
    result.details |= {"width": table[prefix + MARKER].shape[1],
                       "transformer_blocks": len(block_numbers(names, "transformer_blocks")),
                       "components": ["transformer"]}
    if ADDITION_T in names:
        result.details["variant"] = "layered"
        return True
    texts = {f"metadata ({key})": value for key, value in result.metadata.items()}
    _describe_variant(result, {**texts, "file name": Path(result.path).name})
    return True


def describe_folder(config: dict, result: ProbeResult) -> None:
    """A folder's variant: Layered by its config, Edit by where it was saved from (`_name_or_path`) if it says."""
    if config.get("use_additional_t_cond"):
        result.details["variant"] = "layered"
        return
    _describe_variant(result, {"config (_name_or_path)": str(config.get("_name_or_path", ""))})
