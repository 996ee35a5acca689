"""Verify files against one checkpoint: render each at several multipliers and judge pass or fail.

The checkpoint's pipeline is loaded once; its renders without any file are cached per (prompt, seed),
so a library of files costs one render per multiplier each. A file is attached at run time
(`runtime_lora`, `runtime_hypernetwork`, `runtime_embedding`), rendered by our own loop (`denoise`),
measured (`measure`) and judged (`verdict`); the grid (`grid`) shows what was judged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from adapterzoo import __version__
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.digest import digest_of
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.model.registry import family_of, sampled_bases
from adapterzoo.formats.probe import probe
from adapterzoo.verify import denoise, measure
from adapterzoo.verify.attach import ADAPTER_KINDS, Attached, attach
from adapterzoo.verify.baseline_cache import BaselineCache
from adapterzoo.verify.grid import draw_grid, save_grid
from adapterzoo.verify.pipeline_load import LoadedPipeline, load_for_sampling, load_pipeline, native_size
from adapterzoo.verify.pipeline_parts import GivenParts
from adapterzoo.verify.vae_load import load_vae
from adapterzoo.verify.verdict import judge

DEFAULT_PROMPT = "a photo of a cat"
DEFAULT_STEPS = 20
FIXED_TIMESTEP = 500  # where the noise prediction is compared: mid-schedule, image and noise both matter
BASES = sampled_bases()
CHECKPOINT_COLUMN = "checkpoint"
VAE_COLUMNS = ["checkpoint VAE", "this VAE"]
KIND_NAMES = {"lora": "LoRA", "lycoris": "LyCORIS", "hypernetwork": "hypernetwork", "embedding": "embedding"}


@dataclass
class VerifyOptions:
    prompts: list[str] | None = None  # None: the default prompt; for an embedding one containing its token
    seeds: list[int] = field(default_factory=lambda: [0])
    multipliers: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    steps: int | None = None  # None: the model's own default (`default_steps`)
    size: tuple[int, int] | None = None  # (W, H); None: the model's own (UNet sample size × VAE factor)
    device: str = "auto"
    dtype: str | None = None  # None: fp16 on CUDA, fp32 elsewhere
    quick: bool = False  # coverage and effect from one noise prediction per multiplier: no grid, no VAE decode
    parts: GivenParts = field(default_factory=GivenParts)  # the parts a transformer-only checkpoint lacks


def default_steps(pipe: Any) -> int:
    """What a model renders with when no --steps is given: its family's own (a step-distilled model's few), else 20."""
    return getattr(pipe, "default_steps", None) or DEFAULT_STEPS


def guidance_parameters(pipe: Any) -> dict[str, Any]:
    """The guidance a render really uses, as recorded: CFG's scale and negative prompt, or what a model without
    CFG declares (a distilled guidance strength, or none)."""
    if denoise.uses_cfg(pipe.unet):
        return {"negative_prompt": denoise.NEGATIVE_PROMPT, "cfg_scale": denoise.cfg_scale(pipe.unet)}
    return dict(getattr(pipe, "guidance", None) or {"guidance": "none"})


def check_size(loaded: LoadedPipeline, size: tuple[int, int]) -> None:
    """--size fits the latents: a multiple of the VAE's factor (times the patch a transformer packs)."""
    factor, patch = denoise.size_step(loaded.pipe)
    if size[0] % (factor * patch) or size[1] % (factor * patch):
        why = f" for {loaded.base}: latents are packed in {patch}x{patch} patches (VAE factor {factor} x {patch})"
        raise AdapterzooError(f"--size {size[0]}x{size[1]}: the size must be a multiple of {factor * patch}"
                              + (why if patch > 1 else ""))


def refuse_other_base(file: Path, found: ProbeResult, base: str, checkpoint: Path) -> None:
    """A file made for another base than the checkpoint's is refused before anything renders, in one line. An
    embedding in named encoder slots fits any base whose family reads every one of them (a T5-only file probes as
    Flux's, and SD3's T5 is the same T5-XXL; an SD3 file fits SD3.5); a LoRA whose modules fit several bases alike
    (`details.also_fits`) fits each."""
    family = family_of(base)
    read = family.sampling.embedding_slots if family is not None and family.sampling is not None else {}
    slots = found.details.get("slots") if found.kind == "embedding" else None
    if slots and set(slots) <= set(read):
        return
    if base in found.details.get("also_fits", ()):  # its modules fit this base too (a Klein 4B attention LoRA)
        return
    if found.base in BASES and found.base != base:
        raise AdapterzooError(f"{found.base} {KIND_NAMES[found.kind]}, {base} checkpoint: {file.name} "
                              f"does not fit {checkpoint.name}")


class Verifier:
    """Loads the checkpoint's pipeline once; verifies many files against it."""

    def __init__(self, checkpoint: Path, options: VerifyOptions, sha256_of: Callable[[Path], str],
                 cache: Path | None = None) -> None:
        if not options.seeds or not options.multipliers:
            raise AdapterzooError("give at least one seed and one multiplier")
        if options.steps is not None and options.steps < 1:
            raise AdapterzooError("--steps must be at least 1")
        self.checkpoint = Path(checkpoint)
        self.options = options
        self.sha256_of = sha256_of
        self.loaded = load_for_sampling(self.checkpoint, options.device, options.dtype, options.parts)
        self.steps = options.steps or default_steps(self.loaded.pipe)
        self.device = self.loaded.pipe.device
        self.dtype = self.loaded.pipe.unet.dtype
        self.base: str = self.loaded.base
        self.size = options.size or native_size(self.loaded)
        self._checkpoint_sha256: str | None = None
        # the checkpoint alone: (latents, image) per (prompt, seed), noise prediction per prompt; each also per
        # CPU thread count, whose split of the work changes the rounding (multiplier 0 must be bit-identical)
        self._renders: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._predictions: dict[tuple[str, int], torch.Tensor] = {}
        self.cache = BaselineCache(cache)  # the same, across runs: None keeps nothing on disk
        check_size(self.loaded, self.size)

    @property
    def checkpoint_sha256(self) -> str:
        if self._checkpoint_sha256 is None:
            self._checkpoint_sha256 = digest_of(self.sha256_of(self.checkpoint))
        return self._checkpoint_sha256

    # -- rendering -----------------------------------------------------------------------------------

    def _condition(self, loaded: LoadedPipeline, prompt: str, insert: denoise.Insert) -> denoise.Conditioning:
        return denoise.with_size(loaded.pipe, denoise.encode_prompt(loaded.pipe, prompt, insert), self.size)

    @torch.no_grad()
    def _render(self, loaded: LoadedPipeline, prompt: str, seed: int, insert: denoise.Insert
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final latents, image)."""
        pipe = loaded.pipe
        positive = self._condition(loaded, prompt, insert)
        cfg = denoise.uses_cfg(pipe.unet)
        negative = self._condition(loaded, denoise.NEGATIVE_PROMPT, {}) if cfg else positive
        noise = denoise.seeded_noise(pipe, self.size, seed)
        return denoise.render(pipe, noise, self.steps, denoise.guided(pipe.unet, positive, negative))

    @torch.no_grad()
    def _prediction(self, prompt: str, insert: denoise.Insert) -> torch.Tensor:
        """The UNet's noise prediction at a fixed latent (first seed) and timestep."""
        pipe = self.loaded.pipe
        noise = denoise.seeded_noise(pipe, self.size, self.options.seeds[0])
        t = torch.tensor(FIXED_TIMESTEP, device=self.device)
        return denoise.unet_prediction(pipe.unet, noise, t, self._condition(self.loaded, prompt, insert)).float()

    def _cache_key(self, what: str, prompt: str, seed: int, **more: Any) -> dict[str, Any]:
        """Everything a baseline depends on."""
        scheduler = self.loaded.pipe.scheduler
        parts = {"parts": self.options.parts.identity()} if self.options.parts else {}
        return {"what": what, "checkpoint_sha256": self.checkpoint_sha256, **parts, "prompt": prompt, "seed": seed,
                **more, **guidance_parameters(self.loaded.pipe), "size": list(self.size),
                "sampler": type(scheduler).__name__, "scheduler": dict(scheduler.config),
                "fixed_timestep": FIXED_TIMESTEP,
                "dtype": str(self.dtype), "vae_dtype": str(self.loaded.pipe.vae.dtype), "device": self.device.type,
                "threads": torch.get_num_threads(),  # CPU rounding follows the split of the work
                "versions": [__version__, diffusers.__version__, transformers.__version__, torch.__version__]}

    def _baseline(self, prompt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, image) of the checkpoint alone."""
        key = (prompt, seed, torch.get_num_threads())
        if key not in self._renders:
            def cache_key() -> dict[str, Any]:  # the schedule too: a family's step spacing is in no config
                timesteps = denoise.schedule(self.loaded.pipe, self.steps, self.size)
                return self._cache_key("render", prompt, seed, steps=self.steps, timesteps=timesteps)

            found = self.cache.get(cache_key,
                                   lambda: dict(zip(("latents", "image"), self._render(self.loaded, prompt, seed, {}))))
            self._renders[key] = (found["latents"].to(self.device), found["image"])
        return self._renders[key]

    def _baseline_prediction(self, prompt: str) -> torch.Tensor:
        key = (prompt, torch.get_num_threads())
        if key not in self._predictions:
            found = self.cache.get(lambda: self._cache_key("prediction", prompt, self.options.seeds[0]),
                                   lambda: {"prediction": self._prediction(prompt, {})})
            self._predictions[key] = found["prediction"].to(self.device)
        return self._predictions[key]

    # -- one file ------------------------------------------------------------------------------------

    def _prompts(self, attached: Attached) -> list[str]:
        prompts = self.options.prompts or [DEFAULT_PROMPT]
        if attached.token is None:
            return list(prompts)
        if self.options.prompts is None:
            return [f"a photo of {attached.token}"]
        return [p if attached.token in p else f"{p}, {attached.token}" for p in prompts]

    def _parameters(self, file: Path, sha: str, kind: str, prompts: list[str], multipliers: list[float]) -> dict:
        return {
            "file": file.name, "sha256": sha, "kind": kind,
            "checkpoint": self.checkpoint.name, "checkpoint_sha256": self.checkpoint_sha256,
            "prompts": prompts, **guidance_parameters(self.loaded.pipe), "seeds": list(self.options.seeds),
            "multipliers": multipliers, "steps": self.steps,
            **denoise.sampler_facts(self.loaded.pipe),
            "size": list(self.size), "device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),
            "vae_dtype": str(self.loaded.pipe.vae.dtype).removeprefix("torch."),
            "fixed_timestep": FIXED_TIMESTEP, "quick": self.options.quick,
            "versions": {"adapterzoo": __version__, "diffusers": diffusers.__version__,
                         "transformers": transformers.__version__, "torch": torch.__version__},
        }

    def verify(self, file: Path, grid: Path | None) -> dict:
        """The verdict on one file as the JSON object `verify --json` prints; AdapterzooError for bad input."""
        start = time.monotonic()
        file = Path(file)
        found = probe(file)
        if self.options.quick:
            grid = None
        if found.kind == "checkpoint":
            return self._verify_checkpoint(file, found, grid, start)
        if found.kind == "vae":
            return self._verify_vae(file, found, grid, start)
        if found.kind not in ADAPTER_KINDS:
            raise AdapterzooError(f"{file.name} is a {found.kind} file; verify reads LoRA, LyCORIS, embeddings, "
                                  "hypernetworks, checkpoints and VAEs")
        refuse_other_base(file, found, self.base, self.checkpoint)
        attached = attach(file, found, self.loaded)
        try:
            return self._verify_attached(file, found, attached, grid, start)
        finally:
            attached.remove()

    def _verify_attached(self, file: Path, found: ProbeResult, attached: Attached, grid: Path | None,
                         start: float) -> dict:
        options = self.options
        prompts = self._prompts(attached)
        rows = [] if options.quick else [(p, s) for p in prompts for s in options.seeds]
        baselines = [self._baseline(attached.without(p), s)[1] for p, s in rows]
        baseline_prediction = self._baseline_prediction(attached.without(prompts[0]))
        handle = attached.hook()
        columns: list[list[torch.Tensor]] = []
        effects: list[dict[str, Any]] = []
        identical_at_zero = True
        predictions_finite = measure.finite(baseline_prediction)
        for multiplier in options.multipliers:
            handle.multiplier = multiplier
            insert = attached.insert()
            images = [self._render(self.loaded, attached.at(p, multiplier), s, insert)[1] for p, s in rows]
            prediction = self._prediction(attached.at(prompts[0], multiplier), insert)
            predictions_finite &= measure.finite(prediction)
            if multiplier == 0:
                identical_at_zero &= all(torch.equal(a, b) for a, b in zip(images, baselines))
                identical_at_zero &= torch.equal(prediction, baseline_prediction)
            columns.append(images)
            pixels = measure.mean_abs_pixel_change(images, baselines) if images else None
            effects.append({"multiplier": multiplier, "mean_abs_pixel_change": pixels,
                            "noise_pred_rel_change": measure.relative_change(prediction, baseline_prediction)})
        attached.coverage["modules_hit"] = sum(1 for calls in handle.calls.values() if calls > 0)
        images = [image for column in columns for image in column] + baselines
        reasons = judge(attached, effects, identical_at_zero, predictions_finite,
                        [measure.image_problem(i, self.base, self.loaded.pipe.vae.dtype) for i in images])
        sha = digest_of(self.sha256_of(file))
        parameters = self._parameters(file, sha, found.kind, prompts, list(options.multipliers))
        if grid is not None:
            cells = [[column[r] for column in columns] for r in range(len(rows))]
            labels = [f"{p} / seed {s}" for p, s in rows]
            save_grid(grid, draw_grid(cells, labels, [f"m = {m:g}" for m in options.multipliers]), parameters)
        return self._result(file, found, sha, reasons, attached.coverage, effects, grid, parameters, start)

    def _verify_checkpoint(self, file: Path, found: ProbeResult, grid: Path | None, start: float) -> dict:
        """A checkpoint is verified by itself: its own pipeline renders the prompts, one column, no multipliers."""
        itself = file.resolve() == self.checkpoint.resolve()  # `verify --registry --kind checkpoint`: load once
        loaded = self.loaded if itself else load_pipeline(file, self.device, self.dtype, self.options.parts)
        prompts = list(self.options.prompts or [DEFAULT_PROMPT])
        if self.options.quick:
            return self._checkpoint_quick(file, found, loaded, prompts, start)
        rows = [(p, s) for p in prompts for s in self.options.seeds]
        images = [(self._baseline(p, s) if itself else self._render(loaded, p, s, {}))[1] for p, s in rows]
        problems = [measure.image_problem(i, loaded.base, loaded.pipe.vae.dtype) for i in images]
        reasons = list(dict.fromkeys(p for p in problems if p))
        sha = digest_of(self.sha256_of(file))
        parameters = self._parameters(file, sha, found.kind, prompts, [])
        if grid is not None:
            save_grid(grid, draw_grid([[i] for i in images], [f"{p} / seed {s}" for p, s in rows],
                                      [CHECKPOINT_COLUMN]), parameters)
        coverage = {"keys_total": found.tensors, "keys_matched": found.tensors, "modules_total": 0,
                    "modules_hit": 0, "unmatched": []}
        return self._result(file, found, sha, reasons, coverage, [], grid, parameters, start)

    def _checkpoint_quick(self, file: Path, found: ProbeResult, loaded: LoadedPipeline, prompts: list[str],
                          start: float) -> dict:
        """--quick on a checkpoint: its noise prediction at the fixed latent and timestep must be finite."""
        noise = denoise.seeded_noise(loaded.pipe, self.size, self.options.seeds[0])
        t = torch.tensor(FIXED_TIMESTEP, device=self.device)
        with torch.no_grad():
            prediction = denoise.unet_prediction(loaded.pipe.unet, noise, t, self._condition(loaded, prompts[0], {}))
        reasons = [] if measure.finite(prediction) else ["the noise prediction holds NaN or inf"]
        sha = digest_of(self.sha256_of(file))
        coverage = {"keys_total": found.tensors, "keys_matched": found.tensors, "modules_total": 0,
                    "modules_hit": 0, "unmatched": []}
        parameters = self._parameters(file, sha, found.kind, prompts, [])
        return self._result(file, found, sha, reasons, coverage, [], None, parameters, start)

    def _verify_vae(self, file: Path, found: ProbeResult, grid: Path | None, start: float) -> dict:
        """A VAE decodes the latents the checkpoint rendered; columns: the checkpoint's VAE, this one."""
        vae = load_vae(file, self.base, self.loaded.pipe.vae)
        prompts = list(self.options.prompts or [DEFAULT_PROMPT])
        rows = [(p, s) for p in prompts for s in self.options.seeds]
        renders = [self._baseline(p, s) for p, s in rows]
        images = [denoise.decode(vae, latents) for latents, _ in renders]
        problems = [measure.image_problem(i, self.base, vae.dtype) for i in images]
        reasons = list(dict.fromkeys(p for p in problems if p))
        change = measure.mean_abs_pixel_change(images, [image for _, image in renders])
        sha = digest_of(self.sha256_of(file))
        parameters = self._parameters(file, sha, found.kind, prompts, [])
        if grid is not None:
            cells = [[image, mine] for (_, image), mine in zip(renders, images)]
            save_grid(grid, draw_grid(cells, [f"{p} / seed {s}" for p, s in rows], VAE_COLUMNS), parameters)
        coverage = {"keys_total": found.tensors, "keys_matched": found.tensors, "modules_total": 0,
                    "modules_hit": 0, "unmatched": []}
        effects = [{"multiplier": 1.0, "mean_abs_pixel_change": change, "noise_pred_rel_change": None}]
        return self._result(file, found, sha, reasons, coverage, effects, grid, parameters, start)

    def _result(self, file: Path, found: ProbeResult, sha: str, reasons: list[str], coverage: dict,
                effects: list[dict], grid: Path | None, parameters: dict, start: float) -> dict:
        return {
            "file": str(file), "sha256": sha, "kind": found.kind, "base": found.base, "format": found.format,
            "checkpoint": str(self.checkpoint), "checkpoint_sha256": self.checkpoint_sha256,
            "verdict": "fail" if reasons else "pass", "reasons": reasons, "coverage": coverage,
            "effects": effects, "grid": str(grid) if grid is not None else None,
            "seconds": round(time.monotonic() - start, 3), "parameters": parameters, "version": __version__,
            "quick": self.options.quick,
        }
