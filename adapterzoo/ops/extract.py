"""`extract`: a kohya LoRA approximating TUNED − BASE, two checkpoints of one model, one target at a time.

Both checkpoints are opened lazily (`formats.checkpoint_targets`: single file or diffusers folder, either
way round), so only the two weights of the current target are in memory. Each weight difference that is
not exactly zero becomes a rank-N LoRA by truncated SVD (`ops.lowrank.extract`), with alpha = its rank.
Differences a LoRA cannot carry (norm weights, embedding tables, biases) are counted and named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.checkpoint_targets import CheckpointTargets, checkpoint_targets
from adapterzoo.formats.io.atomic import check_output
from adapterzoo.formats.lora.lora_model import LoraFile, LoraModule
from adapterzoo.ops.kohya_output import write_kohya
from adapterzoo.ops.lowrank import Rank, extract
from adapterzoo.ops.provenance import Hasher, Source, provenance_metadata, rule_setting
from adapterzoo.ops.retention import Retention

# nn.Embedding tables hold rows to look up, not a matrix to multiply: no LoRA loader patches them.
EMBEDDING_TABLES = ("token_embedding", "position_embedding")


def extract_lora(base: str | os.PathLike, tuned: str | os.PathLike, dest: str | os.PathLike, rank: int,
                 device: torch.device, sha256: Hasher, force: bool = False,
                 progress_bar: bool = False) -> dict[str, Any]:
    """Write a rank-`rank` kohya LoRA of `tuned` − `base` to `dest`; returns the report. `progress_bar`
    counts the weights compared on stderr (two SD1.5 UNets take about 20 s on 2 CPU cores)."""
    rule = Rank(rank)
    base, tuned = Path(base), Path(tuned)
    dest = check_output(dest, [base, tuned], force)
    if dest.suffix != ".safetensors":
        raise AdapterzooError("an extracted LoRA is a kohya .safetensors file; name the output *.safetensors")
    before, after = checkpoint_targets(base), checkpoint_targets(tuned)
    common = _common_targets(before, after)
    sources = [Source(base, sha256(base), role="base"), Source(tuned, sha256(tuned), role="tuned")]
    modules: dict[str, LoraModule] = {}
    rows: list[dict[str, Any]] = []
    retention = Retention()
    unrepresentable: list[str] = []
    skipped = 0
    for path in tqdm(common, desc="extract", unit="weight", disable=None if progress_bar else True):
        shape = before.architecture.targets[path].shape
        new = after.weight(path)
        dtype = new.dtype
        diff = new.to(device, torch.float32) - before.weight(path).to(device, torch.float32)
        if not _is_lora_target(path, shape):
            if bool(diff.any()):
                unrepresentable.append(path)
            continue
        t = extract(diff, rule)
        if t is None:
            skipped += 1
            continue
        modules[path] = LoraModule(t.down.to("cpu", dtype), t.up.to("cpu", dtype), float(t.kept_rank), shape)
        rows.append({"module": path, "rank": t.kept_rank, "retained_fro": t.retained_fro})
        retention.add(t.retained_fro, float(diff.double().square().sum()))
    unrepresentable += _changed_biases(before, after, common)
    if not modules:
        raise AdapterzooError(f"{tuned.name} differs from {base.name} in no weight a LoRA can carry; "
                              "nothing to extract")
    lora = LoraFile(modules, before.architecture, "kohya")
    settings = {"rule": rule_setting(rule), "device": device.type}
    write_kohya(lora, dest, provenance_metadata("extract", sources, **settings))
    report: dict[str, Any] = {"base": str(base), "tuned": str(tuned), "output": str(dest),
                              "model": before.base, **settings, "modules": rows, "skipped_zero": skipped,
                              "retained_fro": retention.fraction}
    if unrepresentable:
        report["warnings"] = [f"{len(unrepresentable)} changed weight(s) a LoRA cannot carry are left out "
                              f"(norms, embedding tables, biases): {', '.join(unrepresentable[:3])}"
                              + (", ..." if len(unrepresentable) > 3 else "")]
        report["left_out"] = unrepresentable
    return report


def _common_targets(before: CheckpointTargets, after: CheckpointTargets) -> list[str]:
    """Targets stored in both, refusing two checkpoints that are not the same model."""
    if before.base != after.base:
        raise AdapterzooError(f"the checkpoints are different models: {before.path.name} (BASE) is {before.base}, "
                              f"{after.path.name} (TUNED) is {after.base}")
    common = [p for p in before.locations if p in after.locations]
    for path in common:
        shapes = before.architecture.targets[path].shape, after.architecture.targets[path].shape
        if shapes[0] != shapes[1]:
            raise AdapterzooError(f"{path} is {list(shapes[0])} in {before.path.name} (BASE) but {list(shapes[1])} "
                                  f"in {after.path.name} (TUNED): not the same model layout")
    if not common:
        raise AdapterzooError(f"{before.path.name} and {after.path.name} share no weights")
    return common


def _is_lora_target(path: str, shape: tuple[int, ...]) -> bool:
    """Linear and Conv2d weights; 1-D norm weights and embedding tables are not."""
    return len(shape) in (2, 4) and path.rsplit(".", 1)[-1] not in EMBEDDING_TABLES


def _changed_biases(before: CheckpointTargets, after: CheckpointTargets, common: list[str]) -> list[str]:
    """`<target>.bias` for every bias that differs (a LoRA changes weights only)."""
    changed = []
    for path in common:
        a, b = before.bias(path), after.bias(path)
        if a is not None and b is not None and not torch.equal(a.float(), b.float()):
            changed.append(f"{path}.bias")
    return changed
