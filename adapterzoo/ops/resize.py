"""`resize`: give every module of a kohya-dialect file a new rank, by optimal (Eckart–Young) truncation.

The file is read module by module and its names are kept: a resize changes ranks, not what the modules
target. LoRA/LoCon modules are truncated from their factors (QR of up and down, SVD of the r x r core;
`ops.lowrank.truncate`), which needs no architecture table (and no diffusers import). LoHa, LoKr and full
modules become LoRAs from their own structure (`ops.lowrank.truncate_module`); only they need the target's
shape, from the built-in table of the file's base. Every module is written with alpha = kept rank, the
scale folded into the factors. Keys outside any module (bundled embeddings) pass through unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.io.atomic import atomic_output, check_output
from adapterzoo.formats.io.tensor_source import TensorSource, open_checkpoint_file
from adapterzoo.formats.io.tensor_table import one_number
from adapterzoo.formats.lora.delta_svd import Structured, module_dtype
from adapterzoo.formats.lora.lora_approx import bias_left_out
from adapterzoo.formats.lora.lora_keys import LYCORIS_PARTS, detect_lora_dialect, group_modules
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.ops.lowrank import Rank, Rule, Truncation, truncate, truncate_module
from adapterzoo.ops.provenance import Hasher, Source, provenance_metadata, rule_setting
from adapterzoo.ops.retention import Retention

KOHYA_DIALECTS = ("kohya", "kohya-ldm", "lycoris")
DOWN, UP, MID = "lora_down.weight", "lora_up.weight", "lora_mid.weight"
_LORA_PARTS = {DOWN, UP, MID, "alpha", "scale"}
# What described the old tensor bytes: kohya's precomputed hashes and ModelSpec's.
_STALE_HASH_KEYS = ("modelspec.hash_sha256",)
_STALE_HASH_PREFIX = "sshs_"


def resize_lora(src: str | os.PathLike, dest: str | os.PathLike, rule: Rule, device: torch.device, sha256: Hasher,
                force: bool = False) -> dict[str, Any]:
    """Write `src` with every LoRA/LoCon module truncated by `rule` to `dest`; returns the report."""
    src = Path(src)
    dest = check_output(dest, [src], force)
    if dest.suffix != ".safetensors":
        raise AdapterzooError("a resized LoRA is a kohya .safetensors file; name the output *.safetensors")
    tensors = open_checkpoint_file(src)
    modules = _grouped_modules(tensors)
    structured = _structured_modules(src, modules)
    source = Source(src, sha256(src))
    grouped = {key for parts in modules.values() for key in parts.values()}
    out: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    retention = Retention()
    for name, parts in modules.items():
        if name in structured:
            module = structured[name]
            rank, t, dtype = getattr(module, "rank", None), truncate_module(module, rule, device), module_dtype(module)
        else:
            rank, t = _truncated(name, parts, tensors, rule, device)
            dtype = tensors.dtypes[parts[UP]]
        out[f"{name}.{DOWN}"] = t.down.to("cpu", dtype).contiguous()
        out[f"{name}.{UP}"] = t.up.to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(t.kept_rank))
        rows.append({"module": name, "rank": rank, "kept_rank": t.kept_rank, "retained_fro": t.retained_fro})
        retention.add(t.retained_fro, t.energy)
    passed = [key for key in tensors.shapes if key not in grouped]
    out.update({key: tensors.get(key).contiguous() for key in passed})
    metadata = _carried(tensors.metadata, rule)
    metadata.update(provenance_metadata("resize", [source], rule=rule_setting(rule), device=device.type))
    with atomic_output(dest) as tmp:
        save_file(out, str(tmp), metadata=metadata)
    report = {"input": str(src), "output": str(dest), "rule": rule_setting(rule), "device": device.type,
              "modules": rows, "passed_through": len(passed), "retained_fro": retention.fraction}
    if warning := bias_left_out(list(structured.values())):
        report["warnings"] = [warning]
    return report


def _grouped_modules(tensors: TensorSource) -> dict[str, dict[str, str]]:
    """module name -> {part: key} for a kohya-dialect file whose modules are all LoRA, LoCon, LoHa, LoKr or full."""
    keys = list(tensors.shapes)
    dialect = detect_lora_dialect(keys)
    if dialect not in KOHYA_DIALECTS:
        spelled = "no LoRA" if dialect is None else f"a {dialect} LoRA"
        raise AdapterzooError(f"resize reads kohya/LyCORIS LoRA files and this is {spelled}; for another "
                              "dialect, write a kohya copy first: adapterzoo convert IN -o OUT.safetensors --to kohya")
    modules = group_modules(keys, dialect)
    dora = [name for name, parts in modules.items() if "dora_scale" in parts]
    if dora:
        raise AdapterzooError(f"{len(dora)} DoRA module(s) (e.g. {dora[0]}): DoRA renormalises W + ΔW, so a "
                              "truncated ΔW is no longer the best approximation; resize refuses them")
    # A norm layer's full module (w_norm, b_norm) has no LoRA form: it passes through unchanged.
    modules = {name: parts for name, parts in modules.items() if not {"w_norm", "b_norm"} & set(parts)}
    ia3 = [name for name, parts in modules.items() if "on_input" in parts]
    if ia3:
        raise AdapterzooError(f"{len(ia3)} IA3 module(s) (e.g. {ia3[0]}): IA3 scales the base weights, so no "
                              "LoRA carries it without them; resize refuses them")
    return modules


def _structured_modules(src: Path, modules: dict[str, dict[str, str]]) -> dict[str, Structured]:
    """The LoHa, LoKr and full modules by name, read against the built-in table of the file's base: their
    factors alone do not say how a conv's kernel splits from its input channels."""
    names = [name for name, parts in modules.items() if not (DOWN in parts and UP in parts and set(parts) <= _LORA_PARTS)]
    if not names:
        return {}
    unknown = [name for name in names if not any(p in LYCORIS_PARTS for p in modules[name])]
    if unknown:
        raise BadFileError(f"module {unknown[0]} has parts {', '.join(sorted(modules[unknown[0]]))}: not a LoRA, "
                           "LoHa, LoKr or full module")
    lora = load_lora(src)
    return {name: lora.modules[lora.architecture.resolve(name).path] for name in names}


def _truncated(name: str, parts: dict[str, str], tensors: TensorSource, rule: Rule, device: torch.device
               ) -> tuple[int, Truncation]:
    """(input rank, truncation) of one module, computed in fp32 on `device`."""
    down, up = (tensors.get(parts[p]).to(device, torch.float32) for p in (DOWN, UP))
    mid = tensors.get(parts[MID]).to(device, torch.float32) if MID in parts else None
    rank = int(down.shape[0])
    pair = down.dim() in (2, 4) and up.dim() in (2, 4) and up.shape[1] == rank and tuple(up.shape[2:]) in ((), (1, 1))
    if not pair:
        raise BadFileError(f"{name}: lora_up {list(up.shape)} and lora_down {list(down.shape)} are not a LoRA pair")
    if mid is not None and (mid.dim() != 4 or tuple(mid.shape[:2]) != (rank, rank) or tuple(down.shape[2:]) != (1, 1)):
        raise BadFileError(f"{name}: lora_mid {list(mid.shape)} does not fit lora_down {list(down.shape)}")
    if "alpha" in parts:
        alpha = one_number(parts["alpha"], tensors.get(parts["alpha"]))
    elif "scale" in parts:  # A1111's per-module override of alpha / r
        alpha = one_number(parts["scale"], tensors.get(parts["scale"])) * rank
    else:
        alpha = float(rank)  # no alpha: every loader uses scale 1
    return rank, truncate(up, down, alpha / rank, rule, mid)


def _carried(metadata: dict[str, str], rule: Rule) -> dict[str, str]:
    """The input's metadata, less the hashes of its old bytes; kohya's nominal dim/alpha where present."""
    out = {k: v for k, v in metadata.items() if k not in _STALE_HASH_KEYS and not k.startswith(_STALE_HASH_PREFIX)}
    nominal = str(rule.n) if isinstance(rule, Rank) else "Dynamic"  # kohya resize_lora's words
    out.update({key: nominal for key in ("ss_network_dim", "ss_network_alpha") if key in out})
    return out
