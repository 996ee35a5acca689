"""Recognise SD1, SD2 and SDXL files from names and shapes (FORMATS.md §1.7, §5): LoRAs, checkpoints and their
parts, diffusers folders, embeddings. Plain Python on a header.
"""

from __future__ import annotations

import re

from adapterzoo.formats.checkpoint.components import single_file_components
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.lora_parts import is_text_encoder_module, module_dims
from adapterzoo.formats.model import unet_names

BASES = ("sd1", "sd2", "sdxl")
CONTEXT_WIDTH_BASE = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # the UNet's cross-attention context width
CONTEXT_BASE = {**CONTEXT_WIDTH_BASE, 1280: "sdxl"}  # a checkpoint's (1280: the SDXL refiner)
HYPERNETWORK_WIDTHS = {1024: "sd2", 768: "sd1", 2048: "sdxl"}  # A1111 hypernetworks are keyed by context width
TE_WIDTH_BASE = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
TE_MLP_BASE = {3072: "sd1", 4096: "sd2", 5120: "sdxl"}
EMBEDDING_WIDTH_BASE = {768: "sd1", 1024: "sd2", 1280: "sdxl"}  # 1280: the clip_g half of an SDXL embedding
IN_CHANNEL_VARIANT = {9: "inpaint", 8: "instruct-pix2pix"}
XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
# Where each base keeps its text encoders in a single file; `.model.` roots are OpenCLIP, `.transformer.`
# roots hold Hugging Face CLIP names (with `text_model.`).
LDM_TEXT_ENCODERS = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
}
TEXT_ENCODER_BASE = {  # a single file's text-encoder root -> the base it marks
    "cond_stage_model.transformer.": "sd1",
    "cond_stage_model.model.": "sd2",
    "conditioner.embedders.0.transformer.": "sdxl",
    "conditioner.embedders.1.model.": "sdxl",
    "conditioner.embedders.0.model.": "sdxl",
}
UNET_ROOTS = (unet_names.LDM_PREFIX, "input_blocks.", "conv_in.")
_DEPTH = re.compile(r"transformer_blocks[._](\d+)[._]")
# SDXL's community families, as names of their base models spell them; NoobAI (trained from Illustrious) first.
SDXL_FAMILIES = (
    ("noobai", re.compile(r"noob[-_ ]?ai|noobxl", re.IGNORECASE)),
    ("illustrious", re.compile(r"illustrious", re.IGNORECASE)),
    ("pony", re.compile(r"pony[-_ ]?diffusion|pony[-_ ]?xl|pony[-_ ]?v6|(?<![a-z])pdxl(?![a-z])|autismmix", re.IGNORECASE)),
    ("sdxl", re.compile(r"sd[-_]?xl[-_]base|stable[-_]diffusion[-_]xl[-_]base", re.IGNORECASE)),
)
# Where a file names the model it is or was trained on, asked in this order. A LoRA's ModelSpec title is its own
# name, not its base's, so a checkpoint's alone is read; `pony` alone is a pony in a base model's file name only.
_FAMILY_FIELDS = ("modelspec.architecture", "modelspec.title", "ss_base_model_version", "ss_sd_model_name")
_LOOSE_PONY = re.compile(r"pony", re.IGNORECASE)
DIT_PREFIXES = ("transformer.", "lora_transformer_", "diffusion_model.")  # a DiT's modules, never a UNet's
# an MMDiT's text stream (joint attention's added projections, its own feed-forward and norm): no UNet has them
_MMDIT_PARTS = re.compile(r"(?:^|[._])(?:add_[qkv]_proj|to_add_out|ff_context|norm1_context)(?:$|[._])")


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """The cross-attention context width of the UNet modules, else the text encoders' widths, else depth. A file
    naming a DiT's transformer (another family's, at a size no family recognised) is none of these."""
    if any(module.startswith(DIT_PREFIXES) or _MMDIT_PARTS.search(module) for module in modules):
        return None
    names = " ".join(modules)
    if "lora_te2_" in names or "text_encoder_2." in names:
        return "sdxl"
    context, te_width, te_mlp = set(), set(), set()
    for module, parts in modules.items():
        dims = module_dims(parts, table)
        if dims is None:
            continue
        out_dim, in_dim = dims
        if is_text_encoder_module(module) or module.startswith("text_encoder:"):
            te_width.add(in_dim)
            if re.search(r"fc1", module):
                te_mlp.add(out_dim)
        else:
            context.add(in_dim)
    for width, base in sorted(CONTEXT_WIDTH_BASE.items(), reverse=True):
        if width in context:
            return base
    for found, widths in ((te_mlp, TE_MLP_BASE), (te_width, TE_WIDTH_BASE)):
        for width, base in widths.items():
            if width in found:
                return base
    if any(int(m.group(1)) >= 1 for m in _DEPTH.finditer(names)) or "label_emb" in names:
        return "sdxl"  # only SDXL stacks more than one transformer block per attention
    return None


def metadata_base(metadata: dict[str, str]) -> str | None:
    """kohya/ModelSpec hints; A1111 and forge classify by these alone (FORMATS.md §6)."""
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or "-xl-" in arch:
        return "sdxl"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2") or "-v2" in arch:
        return "sd2"
    if version.startswith("sd_v1") or "-v1" in arch:
        return "sd1"
    return None


def sdxl_family(metadata: dict[str, str], checkpoint: bool) -> tuple[str, str | None]:
    """(pony | illustrious | noobai | sdxl, the metadata field that named it, or None for SDXL by default)."""
    for field in _FAMILY_FIELDS:
        text = metadata.get(field, "")
        if not text or (field == "modelspec.title" and not checkpoint):
            continue
        for family, pattern in SDXL_FAMILIES:
            if pattern.search(text):
                return family, field
        if field == "ss_sd_model_name" and _LOOSE_PONY.search(text):
            return "pony", field
    return "sdxl", None


def describe_sdxl_family(result: ProbeResult) -> None:
    """`details.family` of an SDXL file, and `details.family_from`: the field that named it, or null where nothing
    did (then the Civitai source's label, if any, says more; see zoo)."""
    if result.base == "sdxl":
        family, where = sdxl_family(result.metadata, result.kind == "checkpoint")
        result.details["family"], result.details["family_from"] = family, where


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    describe_sdxl_family(result)


def pipeline_base(pipeline_class: str, config: dict) -> str | None:
    """A diffusers folder's base: SDXL pipelines by class, any other by its UNet's context width."""
    if pipeline_class in XL_PIPELINES:
        return "sdxl"
    context = config.get("cross_attention_dim")
    return CONTEXT_BASE.get(context) if isinstance(context, int) else None


def embedding_base(slots: dict[str, int]) -> str | None:
    """kohya's SDXL clip_l + clip_g pair, or one CLIP's vectors by their width."""
    if set(slots) == {"clip_l", "clip_g"}:
        return "sdxl"
    return EMBEDDING_WIDTH_BASE.get(slots[""]) if set(slots) == {""} else None


def hypernetwork_base(widths: list[int]) -> str | None:
    return next((base for width, base in HYPERNETWORK_WIDTHS.items() if width in widths), None)


def _has(keys: list[str], fragment: str) -> bool:
    return any(fragment in k for k in keys)


def _unet_naming(keys: list[str]) -> str | None:
    if any(k.startswith((unet_names.LDM_PREFIX + "input_blocks.", "input_blocks.")) for k in keys):
        return "ldm"
    if any(k.startswith("conv_in.") for k in keys) and _has(keys, "down_blocks."):
        return "diffusers"
    return None


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """Fill `result` if the tensors are an SD checkpoint, a UNet alone, or a ControlNet."""
    keys = list(table)
    naming = _unet_naming(keys)
    controlnet = any(k.startswith(("control_model.", "controlnet_cond_embedding.", "input_hint_block.")) for k in keys)
    if naming is None and not controlnet:
        return False
    result.kind = "controlnet" if controlnet else "checkpoint"
    result.format = naming or "ldm"
    result.details["components"] = single_file_components(keys, "unet", UNET_ROOTS)
    context = [m.shape[1] for k, m in table.items() if k.endswith("attn2.to_k.weight") and len(m.shape) == 2]
    te_bases = [base for prefix, base in TEXT_ENCODER_BASE.items() if any(k.startswith(prefix) for k in keys)]
    if context:
        width = max(context)
        result.base = CONTEXT_BASE.get(width, "unknown")
        result.details["context_dim"] = width
        if width == 1280:
            result.details["variant"] = "refiner"
    elif te_bases:
        result.base = max(te_bases, key=BASES.index)
    if _has(keys, "label_emb.") or _has(keys, "add_embedding."):
        result.base = "sdxl"
    for key in (unet_names.LDM_PREFIX + "input_blocks.0.0.weight", "input_blocks.0.0.weight", "conv_in.weight"):
        if key in table and len(table[key].shape) == 4:
            in_channels = table[key].shape[1]
            result.details["in_channels"] = in_channels
            if in_channels in IN_CHANNEL_VARIANT:
                result.details["variant"] = IN_CHANNEL_VARIANT[in_channels]
            break
    if sum(k.startswith("model_ema.") for k in keys) > 100:
        result.details["ema"] = True
    for key, meta in table.items():
        if key.endswith("embeddings.position_ids") and not meta.dtype.startswith("I"):
            result.warnings.append(f"{key} is stored as {meta.dtype}, not int64: a broken CLIP from a bad merge")
    describe_sdxl_family(result)
    return True


def single_file_base(table: TensorTable) -> str | None:
    """The base of an SD checkpoint (or UNet alone) from its tensors; None if it is none."""
    result = ProbeResult(path="")
    if not probe_checkpoint(table, result) or result.kind != "checkpoint":
        return None
    return result.base
