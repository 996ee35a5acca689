"""Serialise the canonical form into each dialect's tensors (and, for PEFT-backed ones, its config).

Scale is never dropped: kohya carries it as per-module `alpha` tensors (LyCORIS parts pass through
unchanged), which every loader reads. diffusers and PEFT keys have no place for it that every loader
reads (ComfyUI, A1111 and diffusers handed a state dict apply B·A), so alpha / r is folded into
`lora_B` and the config says `lora_alpha = r`: header, `adapter_config.json` or neither, ΔW is B·A.
The alphas before folding are recorded under `adapterzoo.folded_alpha`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.lora_model import (
    AdapterModule,
    FullModule,
    Ia3Module,
    LohaModule,
    LokrModule,
    LoraFile,
    LoraModule,
    dora_on_output,
)
from adapterzoo.formats.lora.lora_parts import DIFFUSERS_ADAPTER_METADATA, PEFT_PREFIX
from adapterzoo.formats.model.targets import Target

Tensors = dict[str, torch.Tensor]
Modules = list[tuple[Target, LoraModule]]
FOLDED_ALPHA = "adapterzoo.folded_alpha"  # JSON per component: lora_alpha + alpha_pattern before folding


def _alpha(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def kohya_parts(module: AdapterModule) -> Tensors:
    if isinstance(module, LoraModule):
        parts = {"lora_down.weight": module.down, "lora_up.weight": module.up, "alpha": _alpha(module.alpha)}
        if module.mid is not None:
            parts["lora_mid.weight"] = module.mid
    elif isinstance(module, LohaModule):
        parts = {"hada_w1_a": module.w1_a, "hada_w1_b": module.w1_b, "hada_w2_a": module.w2_a,
                 "hada_w2_b": module.w2_b, "hada_t1": module.t1, "hada_t2": module.t2, "alpha": _alpha(module.alpha)}
    elif isinstance(module, LokrModule):
        parts = {"lokr_w1": module.w1, "lokr_w1_a": module.w1_a, "lokr_w1_b": module.w1_b, "lokr_w2": module.w2,
                 "lokr_w2_a": module.w2_a, "lokr_w2_b": module.w2_b, "lokr_t2": module.t2,
                 "alpha": _alpha(module.alpha)}
    elif isinstance(module, Ia3Module):
        return {"weight": module.weight, "on_input": torch.tensor(module.on_input)}
    else:
        norm = module.diff.dim() == 1  # LayerNorm/GroupNorm weights: LyCORIS's norm module spelling
        parts = {"w_norm" if norm else "diff": module.diff, "b_norm" if norm else "diff_b": module.diff_b}
    if not isinstance(module, FullModule):
        parts["dora_scale"] = module.dora_scale
    return {name: tensor for name, tensor in parts.items() if tensor is not None}


def kohya_tensors(lora: LoraFile) -> Tensors:
    """kohya / LyCORIS keys, named as kohya's trainer names them for this base (LDM UNet names for SDXL)."""
    out: Tensors = {}
    for path, module in lora.modules.items():
        name = lora.architecture.kohya_name(lora.architecture.targets[path])
        out.update({f"{name}.{part}": tensor.contiguous() for part, tensor in kohya_parts(module).items()})
    return out


def _plain(lora: LoraFile, to: str) -> Modules:
    others = Counter(type(m).__name__ for m in lora.modules.values() if not isinstance(m, LoraModule))
    if others:
        kinds = ", ".join(f"{n} {k.removesuffix('Module')}" for k, n in sorted(others.items()))
        raise AdapterzooError(f"{to} holds plain LoRA modules only; this file has {kinds}")
    return [(lora.architecture.targets[path], module) for path, module in lora.modules.items()]


def _peft_parts(target: Target, module: LoraModule) -> Tensors:
    parts = {"lora_A.weight": module.full_down().contiguous(), "lora_B.weight": module.up.contiguous()}
    if module.dora_scale is not None:
        if not dora_on_output(module.dora_scale):
            raise AdapterzooError(
                f"{target.path}: DoRA scale is per input column; PEFT's magnitude is per output row only"
            )
        magnitude = module.dora_scale.flatten()  # PEFT: [out] for Linear, [1, out, 1, 1] for Conv2d
        parts["lora_magnitude_vector"] = magnitude.reshape(1, -1, 1, 1) if len(target.shape) == 4 else magnitude
    return parts


def lora_config(modules: Modules) -> dict:
    """LoraConfig fields for one component: the commonest rank/alpha plus patterns for the rest."""
    ranks = {t.module_path: m.rank for t, m in modules}
    alphas = {t.module_path: m.alpha for t, m in modules}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {path: r for path, r in ranks.items() if r != rank},
        "alpha_pattern": {path: a for path, a in alphas.items() if a != alpha},
        "target_modules": sorted(ranks),
        "use_dora": any(m.dora_scale is not None for _, m in modules),
        "use_rslora": False,  # rsLoRA's alpha/√r was turned into a plain alpha on read
    }


def _by_component(modules: Modules) -> dict[str, Modules]:
    out: dict[str, Modules] = {}
    for target, module in modules:
        out.setdefault(target.component, []).append((target, module))
    return out


def fold_scale(module: LoraModule) -> LoraModule:
    """alpha / r multiplied into up in fp32, cast back to up's dtype; alpha = r, so ΔW = up @ down."""
    return replace(module, up=(module.up.float() * module.scale).to(module.up.dtype), alpha=float(module.rank))


def _folded(lora: LoraFile, to: str) -> tuple[dict[str, Modules], dict[str, str]]:
    """Modules per component with their scale folded in, and the header entry naming the alphas folded.

    A file that already records folded alphas (one we wrote) keeps its record: those are the originals.
    """
    components = _by_component(_plain(lora, to))
    record = {c: {k: lora_config(ms)[k] for k in ("lora_alpha", "alpha_pattern")} for c, ms in components.items()}
    folded = {c: [(t, fold_scale(m)) for t, m in ms] for c, ms in components.items()}
    return folded, {FOLDED_ALPHA: lora.metadata.get(FOLDED_ALPHA, json.dumps(record, sort_keys=True))}


def diffusers_tensors(lora: LoraFile) -> tuple[Tensors, dict[str, str]]:
    """PEFT-backed diffusers keys (`unet.<path>.lora_A.weight`) and the header diffusers' loader reads."""
    tensors: Tensors = {}
    adapter_metadata: dict = {}
    components, record = _folded(lora, "diffusers")
    for component, modules in components.items():
        for target, module in modules:
            prefix = f"{component}.{target.module_path}"
            tensors.update({f"{prefix}.{part}": t for part, t in _peft_parts(target, module).items()})
        adapter_metadata.update({f"{component}.{k}": v for k, v in lora_config(modules).items()})
    header = {"format": "pt", DIFFUSERS_ADAPTER_METADATA: json.dumps(adapter_metadata, sort_keys=True), **record}
    return tensors, header


def peft_adapters(lora: LoraFile) -> tuple[dict[str, tuple[Tensors, dict]], dict[str, str]]:
    """Per component: `adapter_model.safetensors` tensors and `adapter_config.json` of a PEFT folder; and
    the header entry naming the alphas folded (every weights file gets it)."""
    adapters = {}
    components, record = _folded(lora, "peft")
    for component, modules in components.items():
        tensors: Tensors = {}
        for target, module in modules:
            prefix = f"{PEFT_PREFIX}{target.module_path}"
            tensors.update({f"{prefix}.{part}": t for part, t in _peft_parts(target, module).items()})
        config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
            **lora_config(modules),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
            "modules_to_save": None,
        }
        adapters[component] = (tensors, config)
    return adapters, record
