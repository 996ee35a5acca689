"""Key spellings only Flux LoRAs use (FLUX.md §3): BFL/ComfyUI `diffusion_model.` names, bare BFL names of
Control LoRAs, XLabs processor slots; and what `probe` says about a Flux LoRA's coverage."""

from __future__ import annotations

import re

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


def detect_flux_dialect(keys: list[str]) -> str | None:
    """`xlabs` or `bfl` (ComfyUI-native `diffusion_model.` names, or bare BFL names as in Control LoRAs)."""
    if any(XLABS_PART.match(k) for k in keys):
        return "xlabs"
    if any(k.startswith("diffusion_model.") and k.endswith(_LORA_ENDINGS) for k in keys):
        return "bfl"
    if any(k.startswith(_BFL_ROOTS) and k.endswith(_LORA_ENDINGS) for k in keys):
        return "bfl"
    return None


def is_control_lora(modules: dict[str, dict[str, str]]) -> bool:
    """BFL Control LoRAs carry bias deltas and replacement norm scales (FLUX.md §3, §4)."""
    return any("lora_B.bias" in parts or re.search(r"(query|key)_norm$", name) for name, parts in modules.items())


def flux_coverage(names: list[str]) -> dict:
    """Which double and single blocks a Flux LoRA patches, which text encoders, and what else."""
    double = sorted({int(m[1]) for n in names if (m := _DOUBLE.search(n))})
    single = sorted({int(m[1]) for n in names if (m := _SINGLE.search(n))})
    encoders = [label for label, prefixes in (("clip_l", _CLIP), ("t5xxl", _T5))
                if any(n.startswith(prefixes) for n in names)]
    return {"double_blocks": double, "single_blocks": single, "text_encoders": encoders,
            "other_modules": sum(1 for n in names if not (_DOUBLE.search(n) or _SINGLE.search(n)
                                                          or n.startswith(_CLIP + _T5)))}
