"""Probe LoRA-family state dicts: dialect, LyCORIS algorithm, rank, alpha, base (FORMATS.md §1, §1.7).

The base is asked of the model families in detection order, from module names and factor shapes first
and only then from metadata; the family that answers adds what it knows (coverage, variants).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.lora_keys import detect_lora_dialect, group_modules
from adapterzoo.formats.lora.lora_parts import DOWN_PARTS, LYCORIS_PARTS
from adapterzoo.formats.model.registry import families, family_of, first

ScalarReader = Callable[[str], float]


def _rank(parts: dict[str, str], table: TensorTable) -> int | None:
    for part in (*DOWN_PARTS, "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if part in parts:
            shape = table[parts[part]].shape
            return shape[0] if shape else None
    return None


def _algo(modules: dict[str, dict[str, str]]) -> str:
    algos = {LYCORIS_PARTS[p] for parts in modules.values() for p in parts if p in LYCORIS_PARTS}
    return "+".join(sorted(algos)) if algos else "locon"


def base_from_metadata(metadata: dict[str, str]) -> str | None:
    """kohya/ModelSpec hints; A1111 and forge classify by these alone (FORMATS.md §6)."""
    return first(family.metadata_base(metadata) for family in families())


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
    base = first(family.lora_base(modules, table) for family in families())
    if base is None and (base := base_from_metadata(metadata)) is not None:
        result.warnings.append("base model read from metadata only; the tensor shapes do not tell")
    result.base = base or "unknown"
    if (family := family_of(result.base)) is not None:
        family.describe_lora(modules, table, result)
    return True
