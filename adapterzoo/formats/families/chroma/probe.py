"""Recognise Chroma files from names and shapes, plain Python on a header.

A Chroma checkpoint has the approximator (`distilled_guidance_layer.*`) and no per-block modulation; a Flux.1
one has `img_mod.lin` / `norm1.linear` and no approximator, so neither is ever taken for the other. A LoRA is
Chroma's by the approximator; one of the blocks' attention and MLP alone has Flux.1's names and shapes too:
Flux.1 claims it, it fits Chroma as well (`lora_fits`), and metadata (kohya's `chroma`) decides.
"""

from __future__ import annotations

from adapterzoo.formats.checkpoint.components import single_file_components
from adapterzoo.formats.families.chroma.modules import APPROXIMATOR, BASE
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.fitting import fits
from adapterzoo.formats.model import unet_names

CHECKPOINT_PREFIXES = ("", unet_names.LDM_PREFIX)
MARKERS = (f"{APPROXIMATOR}.in_proj.weight",)
BLOCKS = ("double_blocks.", "transformer_blocks.")
ROOTS = (unet_names.LDM_PREFIX, APPROXIMATOR + ".", "double_blocks.", "transformer_blocks.")


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    return BASE if any(APPROXIMATOR in name for name in modules) else None


def lora_fits(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    from adapterzoo.formats.families.chroma.modules import builtin_architecture

    return BASE if fits(modules, table, builtin_architecture()) else None


def metadata_base(metadata: dict[str, str]) -> str | None:
    """kohya's `ss_base_model_version` / ModelSpec id `chroma`."""
    names = (metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", ""))
    return BASE if any(name.lower().startswith(BASE) for name in names) else None


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    from adapterzoo.formats.families.flux.probe import coverage

    result.details["coverage"] = coverage(list(modules))


def checkpoint_prefix(keys: dict | list) -> str | None:
    """`""` or `model.diffusion_model.` for a Chroma transformer's keys (BFL or diffusers names); None otherwise."""
    found = next((p for p in CHECKPOINT_PREFIXES for marker in MARKERS if p + marker in keys), None)
    return found if found is not None and any(k.startswith(tuple(found + b for b in BLOCKS)) for k in keys) else None


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    prefix = checkpoint_prefix(table)
    if prefix is None:
        return False
    keys = list(table)
    result.kind, result.base = "checkpoint", BASE
    result.format = "ldm" if any(k.startswith(prefix + "double_blocks.") for k in keys) else "diffusers"
    result.details["components"] = single_file_components(keys, "transformer", ROOTS)
    return True
