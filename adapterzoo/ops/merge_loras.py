"""`merge-loras`: several LoRAs of one base into one kohya LoRA whose ΔW is Σ wᵢ·ΔWᵢ (FORMATS.md §1.5).

concat stacks the ranks of LoRA/LoCon modules and is exact; svd re-factorises the sum to a rank rule
(`ops.lowrank.svd_merge`: from the stacked factors, LoHa and LoKr from their own structure) and reports
how much of it each module kept. Inputs are read into the canonical form, so files of different dialects
merge, module by module, on the real target they change; the targets are the built-in tables' or, with a
checkpoint, that model's own.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.checkpoint_targets import check_lora_base, checkpoint_targets
from adapterzoo.formats.io.atomic import check_output
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.lora.delta_svd import module_dtype
from adapterzoo.formats.lora.lora_approx import bias_left_out
from adapterzoo.formats.lora.lora_model import FullModule, Ia3Module, LohaModule, LokrModule, LoraFile, LoraModule
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.members import check_members
from adapterzoo.formats.model.targets import Architecture
from adapterzoo.formats.probe import probe
from adapterzoo.ops.kohya_output import write_kohya
from adapterzoo.ops.lowrank import Rule, concat, fold_tucker, svd_merge
from adapterzoo.ops.provenance import Hasher, Source, provenance_metadata, rule_setting
from adapterzoo.ops.retention import Retention

METHODS = ("concat", "svd")

Pair = tuple[torch.Tensor, torch.Tensor, float, float]
_KINDS = {LohaModule: "LoHa", LokrModule: "LoKr", Ia3Module: "IA3", FullModule: "full"}


def merge_loras(inputs: Sequence[tuple[str | os.PathLike, float]], dest: str | os.PathLike, method: str,
                rule: Rule | None, device: torch.device, sha256: Hasher, force: bool = False,
                checkpoint: str | os.PathLike | None = None, allow_variant_mismatch: bool = False) -> dict[str, Any]:
    """Write Σ weight · ΔW of the (path, weight) `inputs` to `dest`; returns the report.

    `checkpoint` resolves the LoRAs' module names against that model's own modules instead of the built-in
    SD1/SD2/SDXL tables, so LoRAs made for non-standard or tiny models merge too; it only names modules, so its
    own member of a family is not compared with the LoRAs'. LoRAs declaring different members the weights cannot
    tell apart are refused, or with `allow_variant_mismatch` merged with a warning (`formats.members`).
    """
    if method not in METHODS:
        raise AdapterzooError(f"--method is one of {' | '.join(METHODS)}, not {method!r}")
    if method == "svd" and rule is None:
        raise AdapterzooError("--method svd needs a rank rule: --rank N, --sv-ratio X, --sv-fro X or --sv-cumulative X")
    if method == "concat" and rule is not None:
        raise AdapterzooError("--method concat is exact and keeps every rank; a rank rule needs --method svd")
    if not inputs:
        raise AdapterzooError("nothing to merge: no LoRA given")
    paths = [Path(path) for path, _ in inputs]
    weights = [float(weight) for _, weight in inputs]
    dest = check_output(dest, [*paths, *([checkpoint] if checkpoint else [])], force)
    if dest.suffix != ".safetensors":
        raise AdapterzooError("a merged LoRA is a kohya .safetensors file; name the output *.safetensors")
    against, found = _checkpoint_architecture(Path(checkpoint), paths) if checkpoint else (None, None)
    warnings = check_members(zip(paths, found or [probe(path) for path in paths]), allow_variant_mismatch)
    loras = [load_lora(path, architecture=against) for path in paths]
    _check_bases(paths, loras)
    for path, lora in zip(paths, loras):
        _check_summable(path, lora, method)
    sources = [Source(path, sha256(path), weight) for path, weight in zip(paths, weights)]
    # Not a source: nothing of it is merged (ModelSpec's merged_from must not name it), it only names the modules.
    named_by = Source(Path(checkpoint), sha256(Path(checkpoint))).to_json() if checkpoint else None
    architecture = loras[0].architecture
    modules: dict[str, LoraModule | FullModule] = {}
    rows: list[dict[str, Any]] = []
    retention = Retention()
    for target in (p for p in architecture.targets if any(p in lora.modules for lora in loras)):
        members = [(lora.modules[target], w) for lora, w in zip(loras, weights) if target in lora.modules]
        first = members[0][0]
        if len(first.shape) == 1:  # a norm layer's weight (LyCORIS w_norm): no LoRA holds it; the sum is exact
            modules[target] = _summed_norm(members)
            rows.append({"module": target, "inputs": len(members), "rank": None})
            continue
        if method == "concat":
            up, down = concat([_pair(module, w, device) for module, w in members])
            rank, row = int(up.shape[1]), {}
        else:
            t = svd_merge(members, rule, device)
            up, down, rank = t.up, t.down, t.kept_rank
            row = {"retained_fro": t.retained_fro}
            retention.add(t.retained_fro, t.energy)
        dtype = module_dtype(first)
        modules[target] = LoraModule(down.to("cpu", dtype), up.to("cpu", dtype), float(rank), first.shape)
        rows.append({"module": target, "inputs": len(members), "rank": rank, **row})
    merged = LoraFile(modules, architecture, "kohya")
    settings = {"method": method, "rule": rule_setting(rule) if rule else None, "device": device.type}
    write_kohya(merged, dest, provenance_metadata("merge-loras", sources, **settings, checkpoint=named_by))
    report: dict[str, Any] = {
        "inputs": [{"path": str(p), "weight": w, "format": lora.source_format, "modules": len(lora.modules)}
                   for p, w, lora in zip(paths, weights, loras)],
        "output": str(dest), "base": architecture.base, "checkpoint": str(checkpoint) if checkpoint else None,
        **settings, "modules": rows,
    }
    if method == "svd":
        report["retained_fro"] = retention.fraction
    dropped = [f"{p}: {', '.join(sorted(lora.embeddings))}" for p, lora in zip(paths, loras) if lora.embeddings]
    warnings += [f"embedded tokens are not merged: {entry}" for entry in dropped]
    warnings += [f"{p}: {w}" for p, lora in zip(paths, loras) if (w := bias_left_out(list(lora.modules.values())))]
    if warnings:
        report["warnings"] = warnings
    return report


def _summed_norm(members: list[tuple[FullModule, float]]) -> FullModule:
    """Σ weight · diff (and diff_b) of full modules on a norm layer, in the first one's dtype."""
    first = members[0][0]
    diff = sum(w * m.diff.float() for m, w in members).to(first.diff.dtype)
    biases = [(m.diff_b, w) for m, w in members if m.diff_b is not None]
    diff_b = sum(w * b.float() for b, w in biases).to(biases[0][0].dtype) if biases else None
    return FullModule(diff, first.shape, diff_b)


def _pair(module: LoraModule, weight: float, device: torch.device) -> Pair:
    """(up, down, scale, weight) in fp32 on `device`; a Tucker mid is folded into a k x k down, exactly."""
    down = module.down if module.mid is None else fold_tucker(module.down, module.mid)
    return module.up.to(device, torch.float32), down.to(device, torch.float32), module.scale, weight


def _checkpoint_architecture(checkpoint: Path, paths: list[Path]) -> tuple[Architecture, list[ProbeResult]]:
    """The checkpoint's own modules, once no LoRA's probed base contradicts it (as `merge` refuses); the probes."""
    targets = checkpoint_targets(checkpoint)
    return targets.architecture, [check_lora_base(targets, path) for path in paths]


def _check_bases(paths: list[Path], loras: list[LoraFile]) -> None:
    if len({lora.base for lora in loras}) > 1:
        which = ", ".join(f"{path} is for {lora.base}" for path, lora in zip(paths, loras))
        raise AdapterzooError(f"these LoRAs are for different base models: {which}")


def _check_summable(path: Path, lora: LoraFile, method: str) -> None:
    """concat stacks LoRA/LoCon factors only; svd also sums LoHa, LoKr and full modules. IA3 and DoRA change W
    by something that depends on W itself, which adds up with nothing."""
    plain = method == "concat"
    others = Counter(_KINDS[type(m)] for m in lora.modules.values()
                     if isinstance(m, Ia3Module) or (plain and not isinstance(m, LoraModule)))
    if others:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(others.items()))
        if "IA3" in others:
            raise AdapterzooError(f"{path} has {kinds} module(s); IA3 scales the base weights, so its change "
                                  "is not a ΔW that adds up with others")
        raise AdapterzooError(f"{path} has {kinds} module(s); --method concat stacks LoRA/LoCon factors only "
                              "(--method svd with a rank rule merges LoHa, LoKr and full modules too)")
    dora = sum(getattr(m, "dora_scale", None) is not None for m in lora.modules.values())
    if dora:
        raise AdapterzooError(f"{path} has {dora} DoRA module(s): DoRA renormalises W + ΔW, so its "
                              "change is not a ΔW that adds up with others")
