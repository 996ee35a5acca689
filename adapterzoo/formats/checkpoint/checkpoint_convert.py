"""`convert_checkpoint`: diffusers folder <-> single-file LDM/SGM checkpoint, and single-file rewrites.

to="ldm" from a folder joins the components into one `.safetensors`; from a single file it
rewrites it (a `.ckpt`/`.pt` through the safe unpickler into safetensors, `--dtype`, `--prune-ema`).
to="diffusers" builds a complete pipeline folder whose configs are inferred from tensor shapes.
A Flux.1 BFL single file becomes a diffusers transformer folder and back (`flux_checkpoint`).
Outputs go to a temporary path beside the destination and are renamed into place when complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.checkpoint.checkpoint_to_diffusers import plan_diffusers, write_diffusers
from adapterzoo.formats.checkpoint.checkpoint_to_ldm import (
    diffusers_to_ldm_plan,
    prediction_warnings,
    rewrite_plan,
)
from adapterzoo.formats.checkpoint.flux_checkpoint import (
    bfl_to_diffusers_plan,
    diffusers_to_bfl_plan,
    flux_transformer_folder,
    write_flux_folder,
)
from adapterzoo.formats.checkpoint.probe_checkpoint import probe_checkpoint
from adapterzoo.formats.io.atomic import atomic_output, check_output
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.safetensors_writer import (
    SAFETENSORS_DTYPES,
    plan_dtype,
    write_safetensors,
)
from adapterzoo.formats.io.tensor_source import TensorSource, open_checkpoint_file
from adapterzoo.formats.io.tensor_table import TensorMeta
from adapterzoo.formats.model import unet_names
from adapterzoo.formats.model.flux_modules import bfl_prefix

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = ("ldm", "diffusers")
FLUX_HEAD_DIM = 128
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def _check_paths(src: Path, dest: Path, to: str, force: bool) -> None:
    """Never write into or over the input; replace only an output of the same kind, and only with force."""
    check_output(dest, [src], force)
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


def _single_file_base(source: TensorSource, name: str) -> str:
    table = {k: TensorMeta(shape, SAFETENSORS_DTYPES.get(source.dtypes[k], "?")) for k, shape in source.shapes.items()}
    result = ProbeResult(path=name)
    if not any(k.startswith(unet_names.LDM_PREFIX) for k in table) or not probe_checkpoint(table, result):
        raise BadFileError(f"{name} is not a single-file checkpoint (no {unet_names.LDM_PREFIX}* weights)")
    return result.base


def _rope_warning(config: dict) -> list[str]:
    """The rope axes are in no weight; say so when they are not Flux.1's own (head_dim 128)."""
    if config["attention_head_dim"] == FLUX_HEAD_DIM:
        return []
    return [f"head dim {config['attention_head_dim']}: rope axes set to {config['axes_dims_rope']} "
            "(the weights do not record them); edit config.json if the model was trained with others"]


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

    if src.is_dir() and (flux := flux_transformer_folder(src)) is not None:
        if to == "diffusers":
            raise AdapterzooError(f"{src} is already a diffusers folder; convert it --to ldm")
        plan = diffusers_to_bfl_plan(flux, torch_dtype)
        with atomic_output(dest) as tmp:
            written = write_safetensors(tmp, plan, {"format": "pt"})
        report = {"base": "flux", "tensors": written, "dtype": plan_dtype(plan), "dropped": 0, "warnings": []}
    elif src.is_dir():
        if not (src / "model_index.json").is_file():
            raise BadFileError(f"{src} is not a diffusers pipeline folder (no model_index.json)")
        if to == "diffusers":
            raise AdapterzooError(f"{src} is already a diffusers folder; convert it --to ldm")
        base, plan = diffusers_to_ldm_plan(src, torch_dtype)
        with atomic_output(dest) as tmp:
            written = write_safetensors(tmp, plan, {"format": "pt"})
        report = {"base": base, "tensors": written, "dtype": plan_dtype(plan), "dropped": 0,
                  "warnings": prediction_warnings(src, base)}
    else:
        source = open_checkpoint_file(src)
        base = "flux" if bfl_prefix(source.shapes) is not None else _single_file_base(source, src.name)
        if to == "diffusers" and base == "flux":
            config, plan, dropped = bfl_to_diffusers_plan(source, torch_dtype)
            with atomic_output(dest, folder=True) as tmp:
                written = write_flux_folder(tmp, config, plan)
            report = {"base": base, "tensors": written, "dtype": plan_dtype(plan), "dropped": dropped,
                      "warnings": _rope_warning(config)}
        elif to == "diffusers":
            planned = plan_diffusers(source, torch_dtype)
            with atomic_output(dest, folder=True) as tmp:
                report = write_diffusers(planned, tmp)
        else:
            plan = rewrite_plan(source, torch_dtype, prune_ema)
            with atomic_output(dest) as tmp:
                written = write_safetensors(tmp, plan, {**source.metadata, "format": "pt"})
            report = {"base": base, "tensors": written, "dtype": plan_dtype(plan),
                      "dropped": len(source.shapes) - written, "warnings": []}
    return {**report, "to": to, "output": str(dest)}
