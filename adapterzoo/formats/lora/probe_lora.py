"""Probe LoRA-family state dicts: dialect, LyCORIS algorithm, rank, alpha, base (FORMATS.md §1, §1.7)."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Callable

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.flux_lora_keys import flux_coverage, is_control_lora
from adapterzoo.formats.lora.lora_keys import (
    DOWN_PARTS,
    LYCORIS_PARTS,
    UP_PARTS,
    detect_lora_dialect,
    group_modules,
)

ScalarReader = Callable[[str], float]

CONTEXT_WIDTH_BASE = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TE_WIDTH_BASE = {768: "sd1", 1024: "sd2", 1280: "sdxl"}
TE_MLP_BASE = {3072: "sd1", 4096: "sd2", 5120: "sdxl"}
_DEPTH = re.compile(r"transformer_blocks[._](\d+)[._]")
FLUX_WIDTH = 3072  # Flux.1's hidden size; SD3's MMDiT blocks are 1536 or 2432 wide


def is_text_encoder_module(module: str) -> bool:
    """Whether a LoRA module (or key) name belongs to a text encoder, in any dialect we read."""
    return module.startswith(("lora_te", "text_encoder", "base_model.model.text_model")) or ".encoder.layers." in module


def _rank(parts: dict[str, str], table: TensorTable) -> int | None:
    for part in (*DOWN_PARTS, "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if part in parts:
            shape = table[parts[part]].shape
            return shape[0] if shape else None
    return None


def _dims(parts: dict[str, str], table: TensorTable) -> tuple[int, int] | None:
    """(out, in) of the target layer, read from whichever factors this module type stores; None if no
    factor is a matrix (a broken file, which the readers refuse; probe only reports what it can)."""
    def shape(part: str) -> tuple[int, ...] | None:
        found = table[parts[part]].shape if part in parts else None
        return found if found is not None and len(found) >= 2 else None

    down = next((shape(p) for p in DOWN_PARTS if p in parts), None)
    up = next((shape(p) for p in UP_PARTS if p in parts), None)
    if down is not None and up is not None:
        return up[0], down[1]
    if (diff := shape("diff")) is not None:
        return diff[0], diff[1]
    if (w1_a := shape("hada_w1_a")) is not None and (w1_b := shape("hada_w1_b")) is not None:
        return w1_a[0], w1_b[1]
    w1 = shape("lokr_w1") or _product(shape("lokr_w1_a"), shape("lokr_w1_b"))
    w2 = shape("lokr_w2") or _product(shape("lokr_w2_a"), shape("lokr_w2_b"))
    if w1 is not None and w2 is not None:
        return w1[0] * w2[0], w1[1] * w2[1]
    return None


def _product(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> tuple[int, ...] | None:
    return (a[0], b[1]) if a is not None and b is not None else None


def _algo(modules: dict[str, dict[str, str]]) -> str:
    algos = {LYCORIS_PARTS[p] for parts in modules.values() for p in parts if p in LYCORIS_PARTS}
    return "+".join(sorted(algos)) if algos else "locon"


def _base_from_shapes(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    names = " ".join(modules)
    if any(m in names for m in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        return "flux"
    if "joint_blocks" in names or ("add_q_proj" in names and "transformer." in names):
        widths = {dims[1] for m, parts in modules.items() if "attn.to_q" in m and (dims := _dims(parts, table))}
        return "flux" if widths == {FLUX_WIDTH} else "sd3"
    if "lora_te2_" in names or "text_encoder_2." in names:
        return "sdxl"
    context, te_width, te_mlp = set(), set(), set()
    for module, parts in modules.items():
        dims = _dims(parts, table)
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
    for found, table_ in ((te_mlp, TE_MLP_BASE), (te_width, TE_WIDTH_BASE)):
        for width, base in table_.items():
            if width in found:
                return base
    if any(int(m.group(1)) >= 1 for m in _DEPTH.finditer(names)) or "label_emb" in names:
        return "sdxl"  # only SDXL stacks more than one transformer block per attention
    return None


def base_from_metadata(metadata: dict[str, str]) -> str | None:
    """kohya/ModelSpec hints; A1111 and forge classify by these alone (FORMATS.md §6)."""
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or "-xl-" in arch:
        return "sdxl"
    if metadata.get("ss_v2") == "True" or version.startswith("sd_v2") or "-v2" in arch:
        return "sd2"
    if version.startswith("flux") or arch.startswith("flux"):
        return "flux"
    if version.startswith("sd_v1") or "-v1" in arch:
        return "sd1"
    return None


def config_number(value: object) -> float | None:
    """A LoraConfig number (lora_alpha, an alpha_pattern value) as a float; None for anything else a config
    file may hold there (a string, a list, true)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _configured_alpha(metadata: dict[str, str], peft_config: dict | None) -> float | None:
    config = peft_config
    if config is None and "lora_adapter_metadata" in metadata:
        try:
            config = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError:
            config = None
    if not isinstance(config, dict):
        return None
    # diffusers prefixes each component's LoraConfig fields: "unet.lora_alpha", "text_encoder.lora_alpha".
    alphas = [a for k, v in config.items()
              if (k == "lora_alpha" or k.endswith(".lora_alpha")) and (a := config_number(v)) is not None]
    return Counter(alphas).most_common(1)[0][0] if alphas else None


def probe_lora(
    table: TensorTable,
    metadata: dict[str, str],
    scalar: ScalarReader,
    result: ProbeResult,
    peft_config: dict | None = None,
) -> bool:
    """Fill `result` if the tensors are a LoRA-family adapter; False when they are not."""
    keys = list(table)
    dialect = detect_lora_dialect(keys)
    if dialect is None:
        return False
    modules = group_modules(keys, dialect)
    result.format = dialect
    lycoris = dialect == "lycoris" or any(p in LYCORIS_PARTS for parts in modules.values() for p in parts)
    result.kind = "lycoris" if lycoris else "lora"
    if lycoris:
        result.details["algo"] = _algo(modules)
    if any("dora_scale" in parts or "lora_magnitude_vector" in parts or "lora_magnitude_vector.weight" in parts
           for parts in modules.values()):
        result.details["dora"] = True
    result.details["modules"] = len(modules)

    ranks = {m: r for m, parts in modules.items() if (r := _rank(parts, table)) is not None}
    if ranks:
        result.rank = max(ranks.values())
        if len(set(ranks.values())) > 1:
            result.details["ranks"] = sorted(set(ranks.values()))
    alphas = [scalar(parts["alpha"]) for parts in modules.values() if "alpha" in parts]
    if alphas:
        result.alpha = Counter(alphas).most_common(1)[0][0]
    elif (configured := _configured_alpha(metadata, peft_config)) is not None:
        result.alpha = configured
    elif result.rank is not None:
        result.alpha = float(result.rank)  # no alpha anywhere: every loader uses scale 1
    # One PEFT config, or several flattened as "<component>.<field>" (per-component PEFT folders).
    if peft_config and any(v for k, v in peft_config.items() if k == "use_rslora" or k.endswith(".use_rslora")):
        result.details["rslora"] = True

    tokens = [k for k in keys if metadata.get(k) == "<embed>"]
    if tokens:
        result.details["embedded_tokens"] = tokens
    base = _base_from_shapes(modules, table)
    if base is None and (base := base_from_metadata(metadata)) is not None:
        result.warnings.append("base model read from metadata only; the tensor shapes do not tell")
    result.base = base or "unknown"
    if result.base == "flux":
        result.details["coverage"] = flux_coverage(list(modules))
        if is_control_lora(modules):
            result.details["variant"] = "control"
            result.warnings.append("a BFL Control LoRA (bias deltas, norm scales, a wider img_in): "
                                   "not an additive LoRA, so convert and merge refuse it")
    return True
