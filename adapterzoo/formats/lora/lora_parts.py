"""LoRA key parts (FORMATS.md §1): which part is which factor, and the layer shape a module's factors describe.

Plain Python on names and shapes, so families recognise a LoRA's base from a header alone.
"""

from __future__ import annotations

from adapterzoo.formats.io.tensor_table import TensorTable

PEFT_PREFIX = "base_model.model."  # what PEFT puts before a module path
DIFFUSERS_ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' header entry for its LoraConfig fields
# Suffix -> part name, longest first so `.lora_down.weight` wins over `.weight`.
KOHYA_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".dora_scale", ".alpha",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".on_input", ".diff", ".diff_b", ".w_norm", ".b_norm", ".scale", ".bias", ".weight",
)
PEFT_SUFFIXES = (
    ".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector.weight",
    ".lora_magnitude_vector", ".alpha",
)
DOWN_PARTS = ("lora_down.weight", "lora_A.weight", "down")
UP_PARTS = ("lora_up.weight", "lora_B.weight", "up")
# A part only LyCORIS writes -> the algorithm it belongs to.
LYCORIS_PARTS = {
    "lora_mid.weight": "locon", "hada_w1_a": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr",
    "lokr_w2": "lokr", "lokr_w2_a": "lokr", "on_input": "ia3", "diff": "full",
}


def split_suffix(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """(module as spelled, part) by the first suffix `key` ends with, e.g. ('lora_unet_..._to_k', 'alpha')."""
    for suffix in suffixes:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix[1:]
    return None


def is_text_encoder_module(module: str) -> bool:
    """Whether a LoRA module (or key) name belongs to a text encoder, in any dialect we read."""
    return module.startswith(("lora_te", "text_encoder", "base_model.model.text_model")) or ".encoder.layers." in module


def module_dims(parts: dict[str, str], table: TensorTable) -> tuple[int, int] | None:
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
