"""Tell LoRA-family dialects apart by key spelling and split keys into (module, part) (FORMATS.md §1).

The dialects every family shares are here; a family's own spellings (`Family.dialects`) are asked for
after cloneofsimo's numbered pairs and before PEFT's prefix, as the most specific come first.
"""

from __future__ import annotations

import functools
import re

from adapterzoo.formats.lora.lora_parts import (
    KOHYA_SUFFIXES,
    LYCORIS_PARTS,
    PEFT_PREFIX,
    PEFT_SUFFIXES,
    split_suffix,
)
from adapterzoo.formats.model.family import Dialect
from adapterzoo.formats.model.registry import families

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
LDM_UNET_MARKERS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")

_LEGACY_PART = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>up|down)\.weight$"
)
_TRANSITIONAL_PART = re.compile(r"^(?P<module>.+?)\.(?:lora|lora_linear_layer)\.(?P<part>up|down)\.weight$")
_CLONEOFSIMO_PART = re.compile(r"^(?P<component>[a-z_0-9]+):(?P<index>\d+):(?P<part>up|down)$")


@functools.cache
def family_dialects() -> dict[str, tuple[Dialect, ...]]:
    """Every family's own dialects by name, in detection order; families may share a name (ComfyUI's `comfy`
    spellings of several families), each recognising and splitting its own keys."""
    found: dict[str, tuple[Dialect, ...]] = {}
    for family in families():
        for dialect in family.dialects:
            found[dialect.name] = found.get(dialect.name, ()) + (dialect,)
    return found


def detect_lora_dialect(keys: list[str]) -> str | None:
    """Format vocabulary of DESIGN.md (kohya, kohya-ldm, diffusers, ...), or None if not a LoRA."""
    if any(_CLONEOFSIMO_PART.match(k) for k in keys):
        return "cloneofsimo"
    for name, dialects in family_dialects().items():
        if any(dialect.speaks(keys) for dialect in dialects):
            return name
    if any(k.startswith(PEFT_PREFIX) and (".lora_A." in k or ".lora_B." in k) for k in keys):
        return "peft"
    if any(_LEGACY_PART.match(k) or _TRANSITIONAL_PART.match(k) for k in keys):
        return "diffusers-legacy"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "diffusers"
    kohya = [k for k in keys if k.startswith(KOHYA_PREFIXES) or k.startswith(("lycoris_", "oft_unet_"))]
    if not kohya:
        return None
    if any((split_key(k, "kohya") or ("", ""))[1] in LYCORIS_PARTS for k in kohya):
        return "lycoris"
    if not any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in kohya):
        return None
    if any(k.startswith(LDM_UNET_MARKERS) for k in kohya):
        return "kohya-ldm"
    return "kohya"


_LORA_WORDS = re.compile(r"lora|lokr|loha|hada_|lycoris", re.IGNORECASE)


def lora_like_key(keys: list[str]) -> str | None:
    """The first key (sorted) naming a LoRA-family part (lora_down, lokr_w1, hada_w1_a, ...): for a file no
    dialect matched, a sign it is a LoRA in a spelling we do not read rather than something else entirely."""
    return next((key for key in sorted(keys) if _LORA_WORDS.search(key)), None)


def split_key(key: str, dialect: str) -> tuple[str, str] | None:
    """(module name as spelled in the file, part) — e.g. ('lora_unet_..._to_k', 'lora_down.weight')."""
    if dialect == "cloneofsimo":
        m = _CLONEOFSIMO_PART.match(key)
        return (f"{m['component']}:{m['index']}", m["part"]) if m else None
    if dialect == "diffusers-legacy":
        m = _LEGACY_PART.match(key)
        if m:
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            return f"{m['module']}.{proj}", m["part"]
        m = _TRANSITIONAL_PART.match(key)
        return (m["module"], m["part"]) if m else None
    if (own := family_dialects().get(dialect)) is not None:
        return next((split for each in own if (split := each.split(key)) is not None), None)
    return split_suffix(key, PEFT_SUFFIXES if dialect in ("diffusers", "peft") else KOHYA_SUFFIXES)


def group_modules(keys: list[str], dialect: str) -> dict[str, dict[str, str]]:
    """module -> {part: key}; keys that belong to no module (embedded tokens) are left out."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        split = split_key(key, dialect)
        if split:
            modules.setdefault(split[0], {})[split[1]] = key
    return modules

