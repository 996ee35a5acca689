"""A DiT pipeline put together from its parts, for families whose sampling spec lists them (`Sampling.parts`).

A single file holds the transformer (BFL's release has no CLIP, T5 or VAE; SAI's SD3.5 files hold the VAE too,
ComfyUI's full Flux.1 checkpoints and SAI's `*_incl_clips` files the text encoders as well): it is loaded in memory
by the family (`transformer_from_file`), never written to a temporary folder. The other parts come from the files
and folders named with `--text-encoders` and `--vae` (`part_files`), then the parts the file bundles, then the
checkpoint folder, then the `--pipeline` folder (which thus gives a bundled encoder its tokenizer without replacing
it), the scheduler last from the family's defaults. What is still missing is named in one line.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.model.family import Family
from adapterzoo.formats.model.parts_pipeline import MODELS

BASE_SEQ, MAX_SEQ, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15  # FluxPipeline's dynamic shift defaults


@dataclass(frozen=True)
class GivenParts:
    """What the user names for the parts a transformer-only checkpoint lacks (`--pipeline`, `--text-encoders`,
    `--vae`)."""

    pipeline: Path | None = None
    text_encoders: tuple[Path, ...] = ()
    vae: Path | None = None

    def __bool__(self) -> bool:
        return bool(self.pipeline or self.text_encoders or self.vae)

    def identity(self) -> list:
        """What a cached baseline depends on: each path with its size and modification time."""
        paths = [p for p in (self.pipeline, *self.text_encoders, self.vae) if p is not None]
        return [[str(Path(p).resolve()), *((Path(p).stat().st_size, Path(p).stat().st_mtime_ns) if Path(p).is_file()
                                           else ())] for p in paths]


class FlowSteps:
    """A flow-matching scheduler behind the calls our loop makes of an SD one (`init_noise_sigma`,
    `scale_model_input`); its dynamic shift is fitted to the latents' token count (`fit_to`); its steps are the
    family pipeline's sigmas (`Sampling.flow_sigmas`), else the scheduler's own spacing; its mu the family's
    (`Sampling.flow_mu`), else the config's."""

    init_noise_sigma = 1.0

    def __init__(self, inner: Any, sigmas: Callable[[int], Any] | None = None,
                 mu: Callable[[tuple[int, ...], int], float] | None = None) -> None:
        self.inner = inner
        self.sigmas = sigmas
        self.mu = mu
        self.tokens = BASE_SEQ
        self.shape: tuple[int, ...] = ()

    def fresh(self) -> FlowSteps:
        """A new one without per-run state (step index), the same rules."""
        return FlowSteps(type(self.inner).from_config(self.inner.config), self.sigmas, self.mu)

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def timesteps(self) -> torch.Tensor:
        return self.inner.timesteps

    def fit_to(self, noise: torch.Tensor) -> None:
        self.tokens = noise.shape[-2] * noise.shape[-1] // 4
        self.shape = tuple(noise.shape)

    def set_timesteps(self, steps: int, device: torch.device | str | None = None) -> None:
        config = self.inner.config
        mu = None
        if self.mu is not None and self.shape:  # unfitted, only the count of steps is asked (`sample`)
            mu = self.mu(self.shape, steps)
        elif config.get("use_dynamic_shifting", False):
            base, top = config.get("base_image_seq_len", BASE_SEQ), config.get("max_image_seq_len", MAX_SEQ)
            low, high = config.get("base_shift", BASE_SHIFT), config.get("max_shift", MAX_SHIFT)
            mu = low + (high - low) * (self.tokens - base) / (top - base)
        if self.sigmas is None:
            self.inner.set_timesteps(steps, device=device, mu=mu)
        else:
            self.inner.set_timesteps(sigmas=self.sigmas(steps), device=device, mu=mu)

    def scale_model_input(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return latents

    def step(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.step(*args, **kwargs)


def _declared(folder: Path) -> dict[str, tuple[str, str]]:
    index = folder / "model_index.json"
    if not index.is_file():
        return {}
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise BadFileError(f"{index}: {exc}") from None
    return {k: tuple(v) for k, v in data.items() if isinstance(v, list) and len(v) == 2 and v[0]}


def _load(library: str, cls: str, where: Path, dtype: torch.dtype | None) -> Any:
    """A part by its class's own loader; models in `dtype` (diffusers and transformers name the argument apart)."""
    kwargs = {} if dtype is None else {"torch_dtype" if library == "diffusers" else "dtype": dtype}
    try:
        return getattr(importlib.import_module(library), cls).from_pretrained(where, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
        raise BadFileError(f"cannot load {where}: {str(exc).splitlines()[0]}") from None


def _transformer_folder(folder: Path, cls: str) -> Path | None:
    for where in (folder / "transformer", folder):
        config = where / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == cls:
            return where
    return None


def parts_family(checkpoint: Path) -> tuple[Family, str] | None:
    """(family, base) when `checkpoint` belongs to a family whose pipeline is put together from parts."""
    from adapterzoo.formats.checkpoint.checkpoint_convert import folder_base
    from adapterzoo.formats.model.registry import family_of
    from adapterzoo.formats.probe import probe

    if checkpoint.is_dir():
        try:
            base = folder_base(checkpoint)
        except AdapterzooError:
            return None
    elif checkpoint.is_file():
        found = probe(checkpoint)
        base = found.base if found.kind == "checkpoint" else None
    else:
        return None
    family = family_of(base) if base else None
    if family is None or family.sampling is None or not family.sampling.parts:
        return None
    return family, base


def load_parts(family: Family, checkpoint: Path, given: GivenParts, dtype: torch.dtype) -> Any:
    """The family's sampling pipeline from a single file or folder; the parts it lacks from `text_encoders` and
    `vae` (files or component folders), then those a single file bundles, then the `pipeline` folder; the
    scheduler, last, from the family's defaults."""
    from adapterzoo.verify.part_files import builtin_tokenizer, load_bundled, load_given, tokenizer_slot

    spec = family.sampling
    found, lone = load_given(family, list(given.text_encoders), given.vae, dtype)
    if checkpoint.is_file():
        found["transformer"] = spec.transformer_from_file(checkpoint, dtype)
        lone |= dict.fromkeys(load_bundled(family, checkpoint, found, dtype), checkpoint)
    folders = [f for f in (checkpoint if checkpoint.is_dir() else None, given.pipeline) if f is not None]
    for name, (library, cls) in (spec.parts | spec.optional).items():
        for folder in folders:
            if name in found:
                break
            library, cls = _declared(folder).get(name, (library, cls))
            if name == "transformer":
                where = _transformer_folder(folder, cls)
            else:
                where = folder / name if (folder / name).is_dir() else None
            if where is not None:
                found[name] = _load(library, cls, where, dtype if name in MODELS else None)
        if name == "transformer" and name in found and spec.refuse is not None and (why := spec.refuse(found[name])):
            raise AdapterzooError(f"{checkpoint.name}: {why}")
    for slot, path in lone.items():
        tokenizer = tokenizer_slot(slot)
        if tokenizer not in found and (builtin := builtin_tokenizer(family, slot, found[slot])) is not None:
            found[tokenizer] = builtin
        if tokenizer not in found:
            what = f"the {slot} it bundles" if path == checkpoint else "a lone text-encoder file"
            raise AdapterzooError(f"{path.name}: {what} carries no tokenizer, and adapterzoo ships "
                                  f"no {(spec.parts | spec.optional)[tokenizer][1]} that fits it; give --pipeline DIR, "
                                  f"a {family.title} diffusers folder holding {tokenizer}/")
    if "scheduler" not in found and spec.scheduler is not None and "transformer" in found:
        found["scheduler"] = spec.scheduler(found["transformer"])
    # a tokenizer is named only beside its text encoder: a missing encoder says it all
    missing = [name for name in spec.parts if name not in found
               and not (name.startswith("tokenizer") and name.replace("tokenizer", "text_encoder") not in found)]
    if missing:
        needs = ", ".join(f"{name} ({spec.parts[name][1]})" for name in missing)
        raise AdapterzooError(f"{checkpoint.name}: no {needs} for a {family.title} pipeline; give text encoders "
                              "with --text-encoders FILE|DIR..., a VAE with --vae FILE, or a diffusers folder holding "
                              "them with --pipeline DIR")
    if not hasattr(found["scheduler"], "scale_model_input"):
        found["scheduler"] = FlowSteps(found["scheduler"], spec.flow_sigmas, spec.flow_mu)
    return spec.assemble(found)
