"""Recognise Flux.1 files from names and shapes (FLUX.md §1.4, §3): LoRAs of every dialect, their coverage and
Control LoRAs, checkpoints (BFL, ComfyUI, diffusers) and their variants. Plain Python on a header.
"""

from __future__ import annotations

import re

from adapterzoo.formats.checkpoint.components import single_file_components
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.lora_parts import module_dims
from adapterzoo.formats.model import unet_names

BASE = "flux"
WIDTH = 3072  # Flux.1's hidden size; SD3's MMDiT blocks are 1536 or 2432 wide
KEY_NORM = "double_blocks.0.img_attn.norm.key_norm.scale"  # marks Flux.1 (diffusers, ComfyUI detection)
BFL_CHECKPOINT_PREFIXES = ("", unet_names.LDM_PREFIX)  # bare (BFL release) or a ComfyUI full checkpoint
IN_CHANNEL_VARIANT = {384: "fill", 128: "depth"}  # packed img_in widths with guidance (FLUX.md §1.4; Canny = Depth)
ROOTS = (unet_names.LDM_PREFIX, "double_blocks.")
BFL_PREFIX = "diffusion_model."
_LORA_ENDINGS = (
    ".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight", ".lora_B.bias",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w2", ".lokr_w2_a", ".hada_w1_a", ".diff",
)
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "final_layer.")
XLABS_PART = re.compile(
    r"^(?P<module>(?:double|single)_blocks\.\d+\.processor\.[a-z0-9_]+)\.(?P<part>down|up)\.weight$"
)
_DOUBLE = re.compile(r"(?:double_blocks|(?<!single_)transformer_blocks)[._](\d+)[._]")
_SINGLE = re.compile(r"(?:single_blocks|single_transformer_blocks)[._](\d+)[._]")
_CLIP = ("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l.")
_T5 = ("lora_te3_", "lora_te2_", "text_encoder_2.", "text_encoders.t5xxl.")


def speaks_xlabs(keys: list[str]) -> bool:
    """XLabs processor slots (FLUX.md §3.4)."""
    return any(XLABS_PART.match(k) for k in keys)


def speaks_bfl(keys: list[str]) -> bool:
    """ComfyUI-native `diffusion_model.` names, or bare BFL names as in Control LoRAs."""
    return any(k.endswith(_LORA_ENDINGS) and (k.startswith(BFL_PREFIX) or k.startswith(_BFL_ROOTS)) for k in keys)


def split_xlabs(key: str) -> tuple[str, str] | None:
    m = XLABS_PART.match(key)
    return (m["module"], m["part"]) if m else None


def is_control_lora(modules: dict[str, dict[str, str]]) -> bool:
    """BFL Control LoRAs carry bias deltas and replacement norm scales (FLUX.md §3, §4)."""
    return any("lora_B.bias" in parts or re.search(r"(query|key)_norm$", name) for name, parts in modules.items())


def coverage(names: list[str]) -> dict:
    """Which double and single blocks a Flux LoRA patches, which text encoders, and what else."""
    double = sorted({int(m[1]) for n in names if (m := _DOUBLE.search(n))})
    single = sorted({int(m[1]) for n in names if (m := _SINGLE.search(n))})
    encoders = [label for label, prefixes in (("clip_l", _CLIP), ("t5xxl", _T5))
                if any(n.startswith(prefixes) for n in names)]
    return {"double_blocks": double, "single_blocks": single, "text_encoders": encoders,
            "other_modules": sum(1 for n in names if not (_DOUBLE.search(n) or _SINGLE.search(n)
                                                          or n.startswith(_CLIP + _T5)))}


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """BFL block names, or MMDiT joint-attention modules exactly Flux.1 wide."""
    names = " ".join(modules)
    if any(m in names for m in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        return BASE
    if "joint_blocks" in names or ("add_q_proj" in names and "transformer." in names):
        widths = {dims[1] for m, parts in modules.items() if "attn.to_q" in m and (dims := module_dims(parts, table))}
        return BASE if widths == {WIDTH} else None
    return None


def metadata_base(metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    return BASE if version.startswith("flux") or metadata.get("modelspec.architecture", "").startswith("flux") else None


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    result.details["coverage"] = coverage(list(modules))
    if is_control_lora(modules):
        result.details["variant"] = "control"
        result.warnings.append("a BFL Control LoRA (bias deltas, norm scales, a wider img_in): "
                               "not an additive LoRA, so convert and merge refuse it")


def lora_refusal(modules: dict[str, dict[str, str]]) -> str | None:
    if not is_control_lora(modules):
        return None
    return ("this is a BFL Control LoRA (bias deltas, replacement norm scales, a wider img_in): "
            "it is not an additive LoRA, and converting or merging it is not supported yet")


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """A Flux transformer: BFL double_blocks or diffusers single_transformer_blocks; dev, schnell, fill, depth."""
    keys = list(table)
    if not any("double_blocks." in k or "single_transformer_blocks." in k for k in keys):
        return False
    result.kind, result.base = "checkpoint", BASE
    double = any("double_blocks." in k for k in keys)
    result.format = "diffusers" if not double and any("transformer_blocks." in k for k in keys) else "ldm"
    if not any("guidance_in." in k or "guidance_embedder." in k for k in keys):
        result.details["variant"] = "schnell"  # no guidance embedder: the one difference in shapes
    else:
        in_channels = next((m.shape[1] for k, m in table.items()
                            if k.endswith(("img_in.weight", "x_embedder.weight")) and len(m.shape) == 2), None)
        result.details["variant"] = IN_CHANNEL_VARIANT.get(in_channels, "dev")
    result.details["components"] = single_file_components(keys, "transformer", ROOTS)
    return True


def bfl_prefix(shapes: dict[str, tuple[int, ...]] | TensorTable) -> str | None:
    """`""` or `model.diffusion_model.` for a Flux.1 single file's keys; None for anything else."""
    return next((p for p in BFL_CHECKPOINT_PREFIXES if p + KEY_NORM in shapes), None)


def embedding_base(slots: dict[str, int]) -> str | None:
    """ComfyUI's per-encoder slots with T5 (FLUX.md §3.5): clip_l and t5xxl, never clip_g."""
    return BASE if "t5xxl" in slots and "clip_g" not in slots else None
