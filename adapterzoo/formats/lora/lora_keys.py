"""Tell LoRA-family dialects apart by key spelling and split keys into (module, part) (FORMATS.md §1)."""

from __future__ import annotations

import re

from adapterzoo.formats.lora.flux_lora_keys import XLABS_PART, detect_flux_dialect

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")
LDM_UNET_MARKERS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")

# Suffix -> part name, longest first so `.lora_down.weight` wins over `.weight`.
_KOHYA_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".dora_scale", ".alpha",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".on_input", ".diff", ".diff_b", ".w_norm", ".b_norm", ".scale", ".bias", ".weight",
)
_PEFT_SUFFIXES = (
    ".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector.weight",
    ".lora_magnitude_vector", ".alpha",
)
_LEGACY_PART = re.compile(
    r"^(?P<module>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>up|down)\.weight$"
)
_TRANSITIONAL_PART = re.compile(r"^(?P<module>.+?)\.(?:lora|lora_linear_layer)\.(?P<part>up|down)\.weight$")
_CLONEOFSIMO_PART = re.compile(r"^(?P<component>[a-z_0-9]+):(?P<index>\d+):(?P<part>up|down)$")

# A part only LyCORIS writes -> the algorithm it belongs to.
LYCORIS_PARTS = {
    "lora_mid.weight": "locon", "hada_w1_a": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr",
    "lokr_w2": "lokr", "lokr_w2_a": "lokr", "on_input": "ia3", "diff": "full",
}


def detect_lora_dialect(keys: list[str]) -> str | None:
    """Format vocabulary of DESIGN.md (kohya, kohya-ldm, diffusers, ...), or None if not a LoRA."""
    if any(_CLONEOFSIMO_PART.match(k) for k in keys):
        return "cloneofsimo"
    if flux := detect_flux_dialect(keys):
        return flux
    if any(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in keys):
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
    if dialect == "xlabs":
        m = XLABS_PART.match(key)
        return (m["module"], m["part"]) if m else None
    suffixes = {"diffusers": _PEFT_SUFFIXES, "peft": _PEFT_SUFFIXES, "bfl": _PEFT_SUFFIXES + _KOHYA_SUFFIXES}
    suffixes = suffixes.get(dialect, _KOHYA_SUFFIXES)
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return None


def group_modules(keys: list[str], dialect: str) -> dict[str, dict[str, str]]:
    """module -> {part: key}; keys that belong to no module (embedded tokens) are left out."""
    modules: dict[str, dict[str, str]] = {}
    for key in keys:
        split = split_key(key, dialect)
        if split:
            modules.setdefault(split[0], {})[split[1]] = key
    return modules


DOWN_PARTS = ("lora_down.weight", "lora_A.weight", "down")
UP_PARTS = ("lora_up.weight", "lora_B.weight", "up")
