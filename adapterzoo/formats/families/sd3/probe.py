"""Recognise SD3 Medium and SD3.5 (Large, Large Turbo, Medium) files from names and shapes. Plain Python on a header.

The three MMDiTs differ in what their weights hold: SD3.5 has RMS-norms on q and k (`ln_q`, `norm_q`), Large is
2432 wide with 38 blocks, Medium 1536 wide with 24 blocks of which the first have a second self-attention
(MMDiT-X: `attn2`). SD3 Medium is as wide and deep as SD3.5 Medium but has neither. A LoRA carries no norms,
so one on a 1536-wide model that leaves `attn2` alone fits SD3 Medium and SD3.5 Medium alike: its metadata
decides, else it reads as SD3.5 Medium (by far the commoner) and says so. Large Turbo has Large's shapes;
only metadata tells it.
"""

from __future__ import annotations

import re

from adapterzoo.formats.checkpoint.components import single_file_components
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.lora_parts import PEFT_SUFFIXES, module_dims
from adapterzoo.formats.model import unet_names

SD3, SD35 = "sd3", "sd35"
LARGE, MEDIUM, TURBO = "large", "medium", "large-turbo"
WIDTHS = {1536: MEDIUM, 2432: LARGE}  # hidden size of each MMDiT (64 per head, heads = depth)
SAI_PREFIXES = ("", unet_names.LDM_PREFIX)  # SAI's release files (bare) and ComfyUI's full checkpoints
COMFY_PREFIX = "diffusion_model."
ROOTS = (unet_names.LDM_PREFIX, "joint_blocks.", "transformer_blocks.")
_LORA_ENDINGS = PEFT_SUFFIXES + (".lora_down.weight", ".lora_up.weight", ".lokr_w1", ".lokr_w1_a", ".hada_w1_a",
                                 ".diff")
_JOINT = re.compile(r"joint_blocks[._](\d+)[._](x_block|context_block)[._](attn2|attn|mlp|adaLN_modulation)")
_DIFFUSERS_BLOCK = re.compile(r"(?<!single_)transformer_blocks[._](\d+)[._](attn2|attn|ff_context|ff|norm1_context|norm1)"
                              r"[._](to_q|to_k|to_v|to_out|add_[qkv]_proj|to_add_out|net|linear)")
_ATTENTION_INPUT = re.compile(r"(x_block[._]attn[._]qkv|[._]attn[._]to_q)$")
_CLIP_L = ("lora_te1_", "text_encoder.", "text_encoders.clip_l.")
_CLIP_G = ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")
_T5 = ("lora_te3_", "text_encoder_3.", "text_encoders.t5xxl.")


def speaks_comfy(keys: list[str]) -> bool:
    """ComfyUI's own names for an SD3 LoRA: the SAI single-file modules under `diffusion_model.` (ComfyUI's
    `model_lora_keys_unet`), or bare as some trainers save them."""
    return any(k.endswith(_LORA_ENDINGS) and k.removeprefix(COMFY_PREFIX).startswith("joint_blocks.") for k in keys)


def _width(modules: dict[str, dict[str, str]], table: TensorTable) -> int | None:
    """The MMDiT's hidden size: the input width of its image-stream attention (fused qkv or to_q)."""
    for name, parts in modules.items():
        if _ATTENTION_INPUT.search(name) and (dims := module_dims(parts, table)):
            return dims[1]
    return None


def _mmdit_modules(names: list[str]) -> list[str]:
    return [n for n in names if _JOINT.search(n) or _DIFFUSERS_BLOCK.search(n)]


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """SAI's joint_blocks names, or diffusers' joint blocks exactly as wide as an SD3 MMDiT (other MMDiTs share
    the diffusers names: Flux.1, Qwen-Image and HunyuanVideo are 3072 wide). The family's answer; which of its
    bases (SD3 or SD3.5) `describe_lora` settles."""
    names = list(modules)
    blocks = _mmdit_modules(names)
    if not blocks or any("single_transformer_blocks" in n or "single_blocks" in n for n in names):
        return None
    if not any(_JOINT.search(n) for n in blocks) and _width(modules, table) not in WIDTHS:
        return None
    return SD35


def _has_attn2(names: list[str]) -> bool:
    return any(re.search(r"(x_block[._]attn2|transformer_blocks[._]\d+[._]attn2)[._]", n) for n in names)


def metadata_hint(metadata: dict[str, str]) -> tuple[str, str | None] | None:
    """(base, variant) that kohya's ModelSpec or training notes name: sd-scripts writes `stable-diffusion-3-medium`,
    `stable-diffusion-3-5-large`, `stable-diffusion-3-5-medium`; others `stable-diffusion-3.5-...`."""
    arch = metadata.get("modelspec.architecture", "").split("/")[0].lower().replace(".", "-")
    version = metadata.get("ss_base_model_version", "").lower().replace(".", "")
    said = arch if arch.startswith("stable-diffusion-3") else version if version.startswith("sd3") else ""
    if not said:
        return None
    if "3-5" in said or "sd35" in said:
        turbo = "turbo" in said or "turbo" in metadata.get("modelspec.title", "").lower()
        variant = TURBO if "large" in said and turbo else LARGE if "large" in said else MEDIUM if "medium" in said else None
        return SD35, variant
    return SD3, None


def metadata_base(metadata: dict[str, str]) -> str | None:
    hint = metadata_hint(metadata)
    return hint[0] if hint else None


def coverage(names: list[str]) -> dict:
    """Which joint blocks a LoRA patches (by number), whether it patches SD3.5 Medium's second attention, which
    text encoders, and how many other modules (embedders, final layer)."""
    blocks = sorted({int(m[1]) for n in names if (m := _JOINT.search(n) or _DIFFUSERS_BLOCK.search(n))})
    encoders = [label for label, prefixes in (("clip_l", _CLIP_L), ("clip_g", _CLIP_G), ("t5xxl", _T5))
                if any(n.startswith(prefixes) for n in names)]
    text = _CLIP_L + _CLIP_G + _T5
    return {"joint_blocks": blocks, "dual_attention": _has_attn2(names), "text_encoders": encoders,
            "other_modules": sum(1 for n in names if not (_JOINT.search(n) or _DIFFUSERS_BLOCK.search(n)
                                                          or n.startswith(text)))}


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    """Coverage and variant; SD3 vs SD3.5 Medium settled by metadata where the tensors cannot tell them apart."""
    names = list(modules)
    result.details["coverage"] = coverage(names)
    width = _width(modules, table)
    hint = metadata_hint(result.metadata)
    if width == 2432:
        result.base, result.details["variant"] = SD35, hint[1] if hint and hint[1] == TURBO else LARGE
    elif _has_attn2(names):
        result.base, result.details["variant"] = SD35, MEDIUM
    elif width == 1536 or width is None:
        result.base = hint[0] if hint else SD35
        if result.base == SD35:
            result.details["variant"] = MEDIUM
        result.details["also_fits"] = [SD3 if result.base == SD35 else SD35]
        said = " as its metadata says" if hint else ""
        result.warnings.append("its modules fit SD3 Medium and SD3.5 Medium alike (only SD3.5 Medium's dual-attention "
                               f"modules would tell them apart); read as {result.base}{said}")
    if hint and width in WIDTHS and hint[1] in (LARGE, TURBO, MEDIUM):
        said = MEDIUM if hint[1] == MEDIUM else LARGE
        if said != WIDTHS[width]:
            result.warnings.append(f"its metadata says SD3.5 {hint[1]}, but its tensors are {WIDTHS[width]}'s "
                                   f"({width} wide); read as {WIDTHS[width]}")


# -- checkpoints -------------------------------------------------------------------------------------------------


def sai_prefix(keys: TensorTable | dict) -> str | None:
    """`""` or `model.diffusion_model.` of an SAI-layout MMDiT (SD3/SD3.5 single files, city96's GGUFs)."""
    return next((p for p in SAI_PREFIXES if f"{p}joint_blocks.0.x_block.attn.qkv.weight" in keys), None)


def _diffusers_mmdit(keys: list[str]) -> bool:
    return "pos_embed.proj.weight" in keys and any(k.startswith("transformer_blocks.0.attn.add_q_proj") for k in keys)


def checkpoint_facts(table: TensorTable) -> dict | None:
    """base, variant, width, depth and layout of an SD3/SD3.5 transformer (single file or diffusers), else None."""
    keys = list(table)
    prefix = sai_prefix(table)
    if prefix is not None:
        width = table[f"{prefix}joint_blocks.0.x_block.attn.qkv.weight"].shape[1]
        blocks = f"{prefix}joint_blocks."
        qk = f"{prefix}joint_blocks.0.x_block.attn.ln_q.weight" in table
        dual = any(k.startswith(blocks) and ".x_block.attn2." in k for k in keys)
        fmt = "ldm"
    elif _diffusers_mmdit(keys):
        width, blocks, fmt = table["pos_embed.proj.weight"].shape[0], "transformer_blocks.", "diffusers"
        qk = "transformer_blocks.0.attn.norm_q.weight" in table
        dual = any(k.startswith(blocks) and ".attn2." in k for k in keys)
    else:
        return None
    depth = len({k[len(blocks):].split(".", 1)[0] for k in keys if k.startswith(blocks)})
    variant = (MEDIUM if dual else LARGE if depth == 38 or width == 2432 else None) if qk else None
    return {"base": SD35 if qk else SD3, "variant": variant, "width": width, "depth": depth, "format": fmt}


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    facts = checkpoint_facts(table)
    if facts is None:
        return False
    result.kind, result.base, result.format = "checkpoint", facts["base"], facts["format"]
    result.details["components"] = single_file_components(list(table), "transformer", ROOTS)
    result.details["depth"] = facts["depth"]
    variant = facts["variant"]
    hint = metadata_hint(result.metadata)
    if hint and hint[0] == SD35 and variant == LARGE and hint[1] == TURBO:
        variant = TURBO  # Large Turbo is Large's shapes; only its metadata tells
    if variant:
        result.details["variant"] = variant
    if hint and (hint[0] != facts["base"] or (hint[1] and variant and hint[1] != variant)):
        said = " ".join(w for w in hint if w)
        found = " ".join(w for w in (facts["base"], variant) if w)
        result.warnings.append(f"its metadata says {said}, but its tensors are {found}'s; read as {found}")
    return True


def file_base(table: TensorTable) -> str | None:
    """A single file in SAI's layout (bare or under `model.diffusion_model.`)."""
    facts = checkpoint_facts(table)
    return facts["base"] if facts and facts["format"] == "ldm" else None


def pipeline_base(pipeline: str, config: dict) -> str | None:
    """A StableDiffusion3 pipeline folder: SD3.5 where its transformer has q/k norms."""
    if not pipeline.startswith("StableDiffusion3"):
        return None
    return SD35 if config.get("qk_norm") else SD3


def embedding_base(slots: dict[str, int]) -> str | None:
    return SD3 if {"t5xxl", "clip_l", "clip_g"} <= set(slots) else None
