"""Where each LoRA target's weight lives inside a checkpoint, asked of the model families in detection order.

LoRA names are resolved against the checkpoint's own modules, whatever its size: the family that owns the
checkpoint (a single file, a diffusers pipeline or model folder, a denoiser saved alone) infers each
part's config, lists its targets and gives each the tensor holding its weight (`WeightLocation`): a key
as stored, a row block of a fused weight, a transposed or half-swapped one. `merge` writes into these
tensors and `extract` reads them.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.checkpoint.probe_checkpoint import probe_checkpoint
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.registry import bases, families
from adapterzoo.formats.model.weight_locations import SINGLE_FILE, CheckpointTargets, WeightLocation
from adapterzoo.formats.probe import probe

__all__ = ["SINGLE_FILE", "CheckpointTargets", "WeightLocation", "check_lora_base", "checkpoint_targets",
           "probe_targets"]


def checkpoint_targets(path: str | os.PathLike) -> CheckpointTargets:
    """Targets and weight locations of a checkpoint: a single file, a diffusers pipeline folder, or a
    denoiser on its own (a diffusers model folder, or a file of its tensors alone)."""
    path = Path(path)
    if not path.exists():
        raise BadFileError(f"{path} does not exist")
    source = None if path.is_dir() else open_checkpoint_file(path)
    for family in families():
        if family.checkpoints.targets and (targets := family.checkpoints.targets(path, source)) is not None:
            return targets
    if source is None:
        raise BadFileError(f"{path.name} is neither a diffusers pipeline (model_index.json) nor a model folder "
                           "(config.json)")
    found = ProbeResult(path=path.name)
    if not probe_checkpoint(source.table(), found) or found.kind != "checkpoint":
        raise BadFileError(f"{path.name} is not a checkpoint (no UNet, transformer or text encoder weights)")
    merged = [family.title for family in families() if family.checkpoints.targets is not None]
    raise BadFileError(f"{path.name} is a {found.base} checkpoint; LoRAs are merged into {', '.join(merged)} ones")


def probe_targets(targets: CheckpointTargets) -> ProbeResult:
    """The checkpoint's probe: a single file's from the header `checkpoint_targets` read, a folder's from its own."""
    if targets.is_folder:
        return probe(targets.path)
    source = targets.sources[SINGLE_FILE]
    found = ProbeResult(path=str(targets.path), metadata=dict(source.metadata))
    probe_checkpoint(source.table(), found)
    return found


def check_lora_base(targets: CheckpointTargets, lora: str | os.PathLike) -> ProbeResult:
    """Refuse a LoRA whose probed base differs from the checkpoint's, unless its tensors fit the checkpoint's base
    as well; an undecided probe passes. Returns the LoRA's probe."""
    found = probe(lora)
    fits = targets.base == found.base or targets.base in found.details.get("also_fits", ())
    if found.base in bases() and not fits:
        raise AdapterzooError(
            f"{Path(lora).name} is a {found.base} {found.kind} but {targets.path.name} is a {targets.base} "
            "checkpoint; a LoRA only fits the base it was trained on"
        )
    ours, theirs = found.details.get("variant"), targets.architecture.variant
    if found.base == targets.base and ours and theirs and ours != theirs:
        raise AdapterzooError(f"{Path(lora).name} is a {found.base} {ours} {found.kind} but {targets.path.name} is a "
                              f"{targets.base} {theirs} checkpoint; their shapes differ, so it does not fit")
    return found
