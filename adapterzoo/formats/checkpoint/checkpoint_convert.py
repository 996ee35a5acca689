"""`convert_checkpoint`: diffusers folder <-> single file, and single-file rewrites, by the family that owns the
checkpoint (`Family.checkpoints`).

to="ldm" from a folder joins the components into one `.safetensors` in the family's single-file layout
(LDM/SGM for SD, BFL for Flux); from a single file it rewrites it (a `.ckpt`/`.pt` through the safe
unpickler into safetensors, `--dtype`, `--prune-ema`), whatever its family. to="diffusers" builds a folder
whose configs are inferred from tensor shapes. Outputs go to a temporary path beside the destination and
are renamed into place when complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.io.atomic import atomic_output, check_output
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, plan_dtype, write_safetensors
from adapterzoo.formats.io.tensor_source import TensorSource, open_checkpoint_file
from adapterzoo.formats.model.family import Family
from adapterzoo.formats.model.registry import families

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = ("ldm", "diffusers")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
EMA_PREFIX = "model_ema."


def _check_paths(src: Path, dest: Path, to: str, force: bool) -> None:
    """Never write into or over the input; replace only an output of the same kind, and only with force."""
    check_output(dest, [src], force, folder=to == "diffusers" and not src.is_dir())
    source, target = src.resolve(), dest.resolve()
    if src.is_dir() and target.is_relative_to(source):
        raise AdapterzooError(f"output {dest} is inside the input folder {src}; refusing to write there")
    if source.is_relative_to(target):
        raise AdapterzooError(f"output {dest} would replace the folder holding the input {src}")
    if to == "ldm" and dest.suffix.lower() not in SAFETENSORS_SUFFIXES:
        raise AdapterzooError(f"output {dest.name} must end in .safetensors (pickles are never written)")
    if dest.exists():
        if to == "ldm" and not dest.is_file():
            raise AdapterzooError(f"{dest} exists and is not a file; refusing to replace it")
        if to == "diffusers" and not any((dest / marker).is_file() for marker in ("model_index.json", "config.json")):
            raise AdapterzooError(f"{dest} exists and is not a diffusers folder; refusing to replace it")


def _folder_family(src: Path) -> Family:
    for family in families():
        if family.checkpoints.owns_folder and family.checkpoints.owns_folder(src):
            return family
    raise BadFileError(f"{src} is not a diffusers pipeline folder (no model_index.json)")


def folder_base(folder: Path) -> str:
    """The base of a diffusers folder, as the family that owns it reads it."""
    family = _folder_family(folder)
    return family.checkpoints.folder_base(folder) if family.checkpoints.folder_base else family.bases[0]


def single_file_as_folder(path: Path, folder: Path, dtype: torch.dtype | None = None) -> dict:
    """Write a single-file checkpoint as a diffusers folder into `folder` (existing, empty); the report."""
    source = open_checkpoint_file(path)
    family, base = file_family(source, path.name)
    if family.checkpoints.to_folder is None:
        raise AdapterzooError(f"{path.name} is a {base} checkpoint, which has no diffusers layout we write")
    return family.checkpoints.to_folder(source, dtype, folder)


def file_family(source: TensorSource, name: str) -> tuple[Family, str]:
    """The family owning a whole single file, and its base."""
    table = source.table()
    for family in families():
        if family.checkpoints.file_base and (base := family.checkpoints.file_base(table)) is not None:
            return family, base
    raise BadFileError(f"{name} is not a single-file checkpoint (no model.diffusion_model.* weights)")


def rewrite_plan(source: TensorSource, dtype: torch.dtype | None, prune_ema: bool) -> list[PlannedTensor]:
    """Every tensor of a single file, cast if asked, without `model_ema.*` when pruning."""
    return [source.planned(k, k, dtype) for k in source.shapes if not (prune_ema and k.startswith(EMA_PREFIX))]


def convert_checkpoint(
    src: Path, dest: Path, to: str, *, dtype: str | None = None, prune_ema: bool = False, force: bool = False
) -> dict:
    """Convert a checkpoint; returns {base, to, output, tensors, dtype, dropped, warnings, ...}.

    `dtype` casts floating tensors (fp16, bf16, fp32); `prune_ema` drops `model_ema.*` when
    rewriting a single file (a diffusers folder never carries EMA weights). Raises AdapterzooError
    (BadFileError for unreadable input) with a one-line reason.
    """
    src, dest = Path(src), Path(dest)
    if to not in TARGETS:
        raise AdapterzooError(f"checkpoints convert to {' or '.join(TARGETS)}, not {to!r}")
    if dtype is not None and dtype not in DTYPES:
        raise AdapterzooError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not src.exists():
        raise BadFileError(f"{src} does not exist")
    _check_paths(src, dest, to, force)
    torch_dtype = DTYPES.get(dtype) if dtype else None
    if src.is_dir():
        family = _folder_family(src)
        if to == "diffusers":
            raise AdapterzooError(f"{src} is already a diffusers folder; convert it --to ldm")
        if family.checkpoints.to_single_file is None:
            raise AdapterzooError(f"{src.name} is a {family.title} folder, which has no single-file layout we write")
        base, plan, warnings = family.checkpoints.to_single_file(src, torch_dtype)
        with atomic_output(dest) as tmp:
            written = write_safetensors(tmp, plan, {"format": "pt"})
        report = {"base": base, "tensors": written, "dtype": plan_dtype(plan), "dropped": 0, "warnings": warnings}
    elif to == "diffusers":
        with atomic_output(dest, folder=True) as tmp:
            report = single_file_as_folder(src, tmp, torch_dtype)
    else:
        source = open_checkpoint_file(src)
        _, base = file_family(source, src.name)
        plan = rewrite_plan(source, torch_dtype, prune_ema)
        with atomic_output(dest) as tmp:
            written = write_safetensors(tmp, plan, {**source.metadata, "format": "pt"})
        report = {"base": base, "tensors": written, "dtype": plan_dtype(plan),
                  "dropped": len(source.shapes) - written, "warnings": []}
    return {**report, "to": to, "output": str(dest)}
