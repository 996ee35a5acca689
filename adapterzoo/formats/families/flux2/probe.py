"""Recognise Flux.2 files (dev, Klein 4B, Klein 9B) from names and shapes, plain Python on a header.

Flux.2 keeps Flux.1's BFL block names (`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`), so what
tells it apart is what Flux.1 lacks (the shared `*_stream_modulation` Linears, diffusers' `to_qkv_mlp_proj`
and `ff.linear_in`) and its shapes: a SwiGLU MLP of ratio 3 and the width (6144 dev, 4096 Klein 9B, 3072
Klein 4B). A LoRA is a release's when every module lands on that release's real-size table with its shape
(`lora.fitting`); the Kleins and dev share none. Klein 4B is as wide as Flux.1, so a LoRA of its
double-block attention alone fits both (`lora_fits`), and metadata decides.
"""

from __future__ import annotations

import re

from adapterzoo.formats.checkpoint.components import single_file_components
from adapterzoo.formats.families.flux2.modules import BASE, CONFIGS, VARIANT_OF_WIDTH
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.fitting import fits
from adapterzoo.formats.lora.lora_parts import module_dims
from adapterzoo.formats.model import unet_names
from adapterzoo.formats.model.layouts import block_count

CHECKPOINT_PREFIXES = ("", unet_names.LDM_PREFIX)
MARKERS = ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight")
ROOTS = (unet_names.LDM_PREFIX, "double_blocks.", "double_stream_modulation_img.", "transformer_blocks.")
# names only Flux.2 has (kohya-flattened too)
_OWN = re.compile(r"stream_modulation|to_qkv_mlp_proj|ff(?:_context)?[._]linear_(?:in|out)|time_guidance_embed"
                  r"|single_transformer_blocks[._]\d+[._]attn[._]to_out(?![._]0)")
# BFL's MLP inputs by their widening, out / in: Flux.2's SwiGLU of ratio 3 (2 × 3 in a double block, q, k, v and
# 2 × 3 in a single block's linear1) against Flux.1's GELU of ratio 4 (4 and 7), at any width
_SWIGLU = ((re.compile(r"(?:img|txt)_mlp[._]0$"), 6), (re.compile(r"single_blocks[._]\d+[._]linear1$"), 9))
_BLOCK = re.compile(r"(?:double_blocks|single_blocks|transformer_blocks)[._]\d+[._]")
_MODELSPEC = {"Flux.2-dev": "dev", "Flux.2-klein-4b": "klein-4b", "Flux.2-klein-9b": "klein-9b"}


def fitted_variant(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """The release (dev, klein-9b, klein-4b) whose modules every module of the LoRA lands on, shapes included."""
    from adapterzoo.formats.families.flux2.modules import builtin_architecture

    return next((variant for variant in CONFIGS if fits(modules, table, builtin_architecture(variant))), None)


def swiglu(modules: dict[str, dict[str, str]], table: TensorTable) -> bool:
    """Whether a BFL-named MLP input of the LoRA widens as Flux.2's SwiGLU does, which no Flux.1 Linear does."""
    for name, parts in modules.items():
        dims = module_dims(parts, table)
        if dims is not None and any(pattern.search(name) and dims[0] == ratio * dims[1] for pattern, ratio in _SWIGLU):
            return True
    return False


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """A Flux.2 LoRA by a name only Flux.2 has or its MLP's widening, or by fitting a Flux.2 release but not
    Flux.1."""
    from adapterzoo.formats.families.flux.modules import flux_architecture

    if any(_OWN.search(name) for name in modules) or swiglu(modules, table):
        return BASE
    if not any(_BLOCK.search(name) for name in modules) or fitted_variant(modules, table) is None:
        return None
    return None if fits(modules, table, flux_architecture()) else BASE


def lora_fits(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """A Klein 4B LoRA of the double blocks' attention alone has Flux.1's shapes: claimed by Flux.1, it fits here too."""
    return BASE if fitted_variant(modules, table) is not None else None


def variant_of(h: int | None, double: int, single: int) -> str | None:
    """dev, klein-9b or klein-4b from the width, if the block numbers fit it."""
    variant = VARIANT_OF_WIDTH.get(h) if h is not None else None
    if variant is None:
        return None
    config = CONFIGS[variant]
    return variant if double < config["num_layers"] and single < config["num_single_layers"] else None


def metadata_variant(metadata: dict[str, str]) -> str | None:
    """musubi-tuner's `ss_base_model_version` (flux_2_dev, flux_2_klein_4b, ...) or ModelSpec id (Flux.2-klein-9b)."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("flux_2_"):
        return version.removeprefix("flux_2_").replace("_", "-")
    return _MODELSPEC.get(metadata.get("modelspec.architecture", "").split("/")[0])


def metadata_base(metadata: dict[str, str]) -> str | None:
    return BASE if metadata_variant(metadata) is not None else None


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    """Coverage, and the member (dev, klein-9b, klein-4b) the widths say; metadata that says another is a warning."""
    from adapterzoo.formats.families.flux.probe import coverage

    result.details["coverage"] = coverage(list(modules))
    variant = fitted_variant(modules, table)
    hinted = metadata_variant(result.metadata)
    if variant is None and hinted is not None:
        variant = hinted
        result.warnings.append(f"Flux.2 member read from metadata only ({hinted}); the tensor shapes do not tell")
    elif variant is not None and hinted is not None and hinted != variant:
        result.warnings.append(f"its metadata says Flux.2 {hinted}, but its tensors are Flux.2 {variant}'s: "
                               "the Klein models and dev do not share LoRAs")
    if variant is not None:
        result.details["variant"] = variant


def checkpoint_prefix(keys: dict | list) -> str | None:
    """`""` or `model.diffusion_model.` for a Flux.2 transformer's keys (BFL or diffusers names); None otherwise."""
    return next((p for p in CHECKPOINT_PREFIXES for marker in MARKERS if p + marker in keys), None)


def describe_folder(config: dict, result: ProbeResult) -> None:
    """The member a diffusers folder's transformer config is."""
    try:
        width = config["num_attention_heads"] * config["attention_head_dim"]
        variant = variant_of(width, config["num_layers"] - 1, config["num_single_layers"] - 1)
    except (KeyError, TypeError):
        return
    if variant is not None:
        result.details["variant"] = variant


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """A Flux.2 transformer, BFL (ComfyUI diffusion_models, BFL release) or diffusers names; its member by width."""
    prefix = checkpoint_prefix(table)
    if prefix is None:
        return False
    result.kind, result.base = "checkpoint", BASE
    bare = {k[len(prefix):]: m for k, m in table.items() if k.startswith(prefix)}
    bfl = MARKERS[0] in bare
    result.format = "ldm" if bfl else "diffusers"
    embedder = bare.get("img_in.weight" if bfl else "x_embedder.weight")
    blocks = ("double_blocks.", "single_blocks.") if bfl else ("transformer_blocks.", "single_transformer_blocks.")
    if embedder is not None and len(embedder.shape) == 2:
        variant = variant_of(embedder.shape[0], *(block_count(bare, root) - 1 for root in blocks))
        if variant is not None:
            result.details["variant"] = variant
    result.details["components"] = single_file_components(list(table), "transformer", ROOTS)
    return True
