"""Recognise Z-Image files from names and shapes, plain Python on a header.

Z-Image is a NextDiT like Lumina 2, whose ComfyUI names it shares (`layers.N.attention.qkv`, `feed_forward.w1`):
its own are diffusers' `attention.to_q` and its per-block modulation `adaLN_modulation.0` (Lumina 2's is `.1`),
and its size (3840 wide, 30 layers). A LoRA is Z-Image's when every module lands on the real model with its
shape, or by diffusers' names. Turbo and Base have the same tensors: the weights cannot tell them apart, so the
variant is read from metadata (or the file name) as a hint, with a warning that says so; it is the family's
`unconfirmed_members`, so merge refuses a Turbo LoRA with a Base checkpoint (or LoRA) and the reverse.
"""

from __future__ import annotations

import re
from pathlib import Path

from adapterzoo.formats.checkpoint.components import single_file_components
from adapterzoo.formats.families.zimage.modules import BASE
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.fitting import fits
from adapterzoo.formats.model import unet_names

CHECKPOINT_PREFIXES = ("", unet_names.LDM_PREFIX, "model.")
MARKERS = ("cap_embedder.1.weight", "layers.0.adaLN_modulation.0.weight")
COMFY_MARKER = "layers.0.attention.qkv.weight"
ROOTS = (unet_names.LDM_PREFIX, "layers.", "noise_refiner.", "cap_embedder.")
_OWN = re.compile(r"(?:layers|noise_refiner|context_refiner)[._]\d+[._]attention[._]to_|all_(?:x_embedder|final_layer)")
_BLOCK = re.compile(r"(?:layers|noise_refiner|context_refiner)[._](\d+)[._]")
_VARIANTS = (("turbo", re.compile(r"z[-_ ]?image[-_ ]?turbo|(?<![a-z])zit(?![a-z])", re.IGNORECASE)),
             ("base", re.compile(r"z[-_ ]?image[-_ ]?base|tongyi-mai(?:/|--)z-image(?![-_]?turbo)", re.IGNORECASE)))
SAME_TENSORS = "Z-Image Turbo and Base have the same tensor names and shapes"


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    from adapterzoo.formats.families.zimage.modules import builtin_architecture

    if any(_OWN.search(name) for name in modules):
        return BASE
    return BASE if fits(modules, table, builtin_architecture()) else None


def metadata_base(metadata: dict[str, str]) -> str | None:
    """musubi-tuner's `ss_base_model_version` z_image / ModelSpec id Z-Image."""
    version, arch = metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")
    return BASE if version == "z_image" or arch.startswith("Z-Image") else None


def variant_hint(texts: dict[str, str]) -> tuple[str, str] | None:
    """(turbo | base, where it was read) from the first text that names one."""
    for where, text in texts.items():
        for variant, pattern in _VARIANTS:
            if pattern.search(text):
                return variant, where
    return None


def _describe_variant(result: ProbeResult, texts: dict[str, str]) -> None:
    """`details.variant` and where it was read (`read_from`, which merge names when a LoRA's is not its
    checkpoint's), with a warning that the weights cannot confirm it."""
    hint = variant_hint(texts)
    if hint is not None:
        result.details |= {"variant": hint[0], "read_from": {"variant": hint[1]}}
        result.warnings.append(f"{SAME_TENSORS}: read as {hint[0]} from its {hint[1]}, which the weights cannot confirm")


def coverage(names: list[str]) -> dict:
    """Which main layers and refiner blocks a Z-Image LoRA patches."""
    found: dict[str, set[int]] = {"layers": set(), "noise_refiner": set(), "context_refiner": set()}
    other = 0
    for name in names:
        m = _BLOCK.search(name)
        if m is None:
            other += 1
        else:
            found[next(b for b in found if b in name[:m.end()])].add(int(m[1]))
    return {**{blocks: sorted(numbers) for blocks, numbers in found.items()}, "text_encoders": [], "other_modules": other}


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    """Coverage; the variant from metadata, then the file name (`..._zimage_turbo.safetensors`)."""
    result.details["coverage"] = coverage(list(modules))
    texts = {f"metadata ({key})": value for key, value in result.metadata.items()}
    _describe_variant(result, {**texts, "file name": Path(result.path).name})


def checkpoint_prefix(keys: dict | list) -> str | None:
    """The prefix of a Z-Image transformer's keys (none, ComfyUI's `model.diffusion_model.`, `model.`)."""
    return next((p for p in CHECKPOINT_PREFIXES if all(p + marker in keys for marker in MARKERS)), None)


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    prefix = checkpoint_prefix(table)
    if prefix is None:
        return False
    keys = list(table)
    result.kind, result.base = "checkpoint", BASE
    result.format = "ldm" if prefix + COMFY_MARKER in table else "diffusers"
    result.details["components"] = single_file_components(keys, "transformer", ROOTS)
    texts = {f"metadata ({key})": value for key, value in result.metadata.items()}
    _describe_variant(result, {**texts, "file name": Path(result.path).name})
    return True


def describe_folder(config: dict, result: ProbeResult) -> None:
    """A folder's variant from where its transformer was saved from (`_name_or_path`), if it says."""
    _describe_variant(result, {"config (_name_or_path)": str(config.get("_name_or_path", ""))})
