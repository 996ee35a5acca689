"""Load the checkpoint a file is verified against, offline: a diffusers folder or a single file.

A single file is built in memory by the family that owns it, from our own converter's plan (every config
inferred from the tensors, tokenizer from the package): nothing is written to disk, the hub is never asked
for a config, and what `convert --to diffusers` would write is exactly what is verified.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from adapterzoo.devices import pick_device
from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.checkpoint.checkpoint_convert import file_family, folder_base
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.architectures import architecture_from_models
from adapterzoo.formats.model.registry import family_of, sampled_bases
from adapterzoo.formats.model.targets import TEXT_ENCODERS, TRANSFORMER, UNET, Architecture
from adapterzoo.verify import denoise
from adapterzoo.verify.pipeline_parts import GivenParts, load_parts, parts_family

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ENCODERS = (*TEXT_ENCODERS, "text_encoder_3")  # a pipeline's third text encoder (a T5) takes LoRAs too


@dataclass
class LoadedPipeline:
    """The pipeline, its base and the table of every module an adapter may patch in it."""

    pipe: DiffusionPipeline
    base: str
    architecture: Architecture

    @property
    def models(self) -> dict[str, torch.nn.Module]:
        names = (TRANSFORMER, *ENCODERS) if hasattr(self.pipe, TRANSFORMER) else (UNET, *ENCODERS)
        return {name: getattr(self.pipe, name) for name in names if getattr(self.pipe, name, None) is not None}


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere, unless told; CPU kernels for half floats are slow or missing."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise AdapterzooError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers and transformers draw a bar per component: noise on stderr for a load of seconds."""
    loggers = [log for log in (diffusers_logging, transformers_logging) if log.is_progress_bar_enabled()]
    for log in loggers:
        log.disable_progress_bar()
    try:
        yield
    finally:
        for log in loggers:
            log.enable_progress_bar()


def _from_folder(folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    if not (folder / "model_index.json").is_file():
        raise BadFileError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    try:
        with _quiet_loading():
            return DiffusionPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise BadFileError(f"diffusers cannot load {folder.name}: {str(exc).splitlines()[0]}") from None


def _from_file(path: Path, dtype: torch.dtype) -> tuple[str, DiffusionPipeline]:
    """A single file's pipeline built in memory by its family, refused in one line when verify cannot render it."""
    source = open_checkpoint_file(path)
    family, base = file_family(source, path.name)
    _rendered(base, path)
    if family.checkpoints.to_pipeline is None:
        raise AdapterzooError(f"{path.name} is a {base} checkpoint, which verify cannot load from a single file")
    return family.checkpoints.to_pipeline(source, dtype)


def _rendered(base: str, checkpoint: Path) -> str:
    if base not in sampled_bases():
        raise AdapterzooError(f"{checkpoint.name} is a {base} checkpoint; verify renders {', '.join(sampled_bases())}")
    return base


def load_pipeline(checkpoint: Path, device: torch.device, dtype: torch.dtype,
                  given: GivenParts | None = None) -> LoadedPipeline:
    """The pipeline of a single-file checkpoint or a diffusers folder, on `device` in `dtype`; a DiT family's
    parts the checkpoint lacks come from the files and folders `given` (a whole pipeline needs none: `refuse_parts`
    says so where a user named one checkpoint; `verify --registry` renders other bases beside it)."""
    checkpoint = Path(checkpoint)
    given = given or GivenParts()
    dit = parts_family(checkpoint)
    if dit is not None:
        family, base = dit
        base = _rendered(base, checkpoint)
        with _quiet_loading():
            pipe = load_parts(family, checkpoint, given, dtype)
    elif checkpoint.is_dir():
        base = _rendered(folder_base(checkpoint), checkpoint)
        pipe = _from_folder(checkpoint, dtype)
    elif checkpoint.is_file():
        base, pipe = _from_file(checkpoint, dtype)
    else:
        raise BadFileError(f"{checkpoint} does not exist")
    check_tokenizers_fit(pipe, checkpoint)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "transformer", "vae", *ENCODERS):
        model = getattr(pipe, name, None)
        if model is not None:
            model.eval().requires_grad_(False)
    loaded = LoadedPipeline(pipe, base, None)
    loaded.architecture = architecture_from_models(base, loaded.models)
    return loaded


def refuse_parts(checkpoint: Path, given: GivenParts) -> None:
    """--text-encoders and --vae on a checkpoint that is a whole pipeline: one line, before anything loads."""
    if (given.text_encoders or given.vae) and parts_family(Path(checkpoint)) is None:
        raise AdapterzooError(f"--text-encoders and --vae give the parts a transformer-only checkpoint lacks; "
                              f"{Path(checkpoint).name} holds its own (verify a VAE file as FILE instead)")


def check_tokenizers_fit(pipe: DiffusionPipeline, checkpoint: Path) -> None:
    """A tokenizer with more tokens than its text encoder has rows ends in an IndexError deep in the first
    prompt's encoding: say which parts do not fit, before any work."""
    for encoder_name in ENCODERS:
        encoder = getattr(pipe, encoder_name, None)
        tokenizer = getattr(pipe, encoder_name.replace("text_encoder", "tokenizer"), None)
        if encoder is None or tokenizer is None:
            continue
        rows = encoder.get_input_embeddings().num_embeddings
        if len(tokenizer) > rows:
            raise BadFileError(
                f"{checkpoint.name}: its {encoder_name} has {rows} token rows but the tokenizer it is loaded with "
                f"has {len(tokenizer)} tokens: the parts do not fit (a text encoder trained with its own small "
                f"vocabulary; verify the diffusers folder it came from, which holds its tokenizer)")


def load_for_sampling(checkpoint: Path, device_name: str, dtype_name: str | None,
                      given: GivenParts | None = None) -> LoadedPipeline:
    """What verify and sample render with: --device and --dtype resolved, and a VAE that overflows to black
    images in fp16 (its family says which) kept in fp32 unless fp16 was asked for by name."""
    device = pick_device(device_name)
    dtype = pick_dtype(dtype_name, device)
    loaded = load_pipeline(checkpoint, device, dtype, given)
    sampling = family_of(loaded.base).sampling
    if loaded.base in sampling.vae_fp32 and dtype == torch.float16 and dtype_name is None:
        loaded.pipe.vae.to(torch.float32)
    return loaded


def native_size(loaded: LoadedPipeline) -> tuple[int, int]:
    """What the model was trained at: 512 for SD1.5 and SD2-base, 768 for SD2-v, 1024 for SDXL."""
    pipe = loaded.pipe
    side = pipe.unet.config.sample_size * denoise.vae_factor(pipe.vae)
    return side, side
