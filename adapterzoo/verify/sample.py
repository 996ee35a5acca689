"""`adapterzoo sample`: one image from a checkpoint and several LoRAs, composed while sampling.

The LoRAs and textual-inversion embeddings are read and hooked exactly as `verify` does (`attach`), the steps
run through our own loop (`denoise`) with the per-step prediction `compose` makes, and the PNG carries A1111's
`parameters` chunk. An embedding acts wherever its token stands in the prompt or the negative prompt, each slot
on its own text encoder, at its weight, in every compose mode (it is part of the prompt, not of the LoRAs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import diffusers
import torch
import transformers
from PIL import Image
from tqdm import tqdm

from adapterzoo import __version__
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.atomic import check_output
from adapterzoo.formats.probe import probe
from adapterzoo.verify import denoise, measure
from adapterzoo.verify.attach import Attached, attach
from adapterzoo.verify.compose import Composition, composed, set_active, switch_schedule
from adapterzoo.verify.grid import a1111_text, autov2, guidance_text, resource_hashes, save_png, versions_text
from adapterzoo.verify.pipeline_load import LoadedPipeline, load_for_sampling, native_size, refuse_parts
from adapterzoo.verify.verdict import named
from adapterzoo.verify.pipeline_parts import GivenParts
from adapterzoo.verify.verifier import (
    check_size,
    default_steps,
    digest_of,
    guidance_parameters,
    refuse_other_base,
)

LORA_KINDS = ("lora", "lycoris")
EMBEDDING_KIND = "embedding"


@dataclass
class SampleOptions:
    prompt: str
    loras: list[tuple[Path, float]]  # (file, weight), in the order LoRA Switch cycles through them
    seed: int = 0
    steps: int | None = None  # None: the model's own default
    size: tuple[int, int] | None = None  # (W, H); None: the base's native size
    negative_prompt: str = denoise.NEGATIVE_PROMPT
    composition: Composition = field(default_factory=Composition)
    device: str = "auto"
    dtype: str | None = None  # None: fp16 on CUDA, fp32 elsewhere
    allow_unmatched: bool = False  # sample with what lands, when some keys land on no module
    parts: GivenParts = field(default_factory=GivenParts)  # the parts a transformer-only checkpoint lacks
    embeddings: list[tuple[Path, float]] = field(default_factory=list)  # textual-inversion files and weights


def attach_loras(loaded: LoadedPipeline, files: list[Path], checkpoint: Path,
                 allow_unmatched: bool = False, kinds: tuple[str, ...] = LORA_KINDS) -> list[Attached]:
    """Read every LoRA (or embedding, `kinds`) and check it fits before any is hooked: a bad one is one line,
    nothing rendered. Keys that land on no module (an embedding's slot on no text encoder) fail it, as verify's
    coverage check does, unless `allow_unmatched`."""
    attached = []
    for file in files:
        found = probe(file)
        if found.kind not in kinds:
            what, option = (("a textual-inversion embedding", "--embedding") if kinds == (EMBEDDING_KIND,)
                            else ("a LoRA or LyCORIS file", "--lora"))
            raise AdapterzooError(f"{file.name} is not {what} (probe says {found.kind}); {option} takes those only")
        refuse_other_base(file, found, loaded.base, checkpoint)
        one = attach(file, found, loaded)
        if one.problems:
            raise AdapterzooError(f"{file.name}: {one.problems[0]}")
        unmatched = one.coverage["unmatched"]
        if unmatched and not allow_unmatched:
            raise AdapterzooError(f"{file.name}: {len(unmatched)} of {one.coverage['keys_total']} key(s) land on no "
                                  f"module of the checkpoint: {named(unmatched)} (--allow-unmatched samples with "
                                  "the rest)")
        attached.append(one)
    return attached


def inserts(embeddings: list[Attached]) -> denoise.Insert:
    """Every hooked embedding's placeholders, per text encoder."""
    merged: denoise.Insert = {}
    for one in embeddings:
        for encoder, words in one.insert().items():
            merged.setdefault(encoder, {}).update(words)
    return merged


def encode_pair(loaded: LoadedPipeline, prompt: str, negative_prompt: str, size: tuple[int, int],
                insert: denoise.Insert | None = None) -> tuple[denoise.Conditioning, denoise.Conditioning]:
    """(positive, negative) as the hooks stand now: text-encoder LoRAs and embeddings act on both. A model
    without CFG reads no negative: the positive stands in for it, unencoded twice."""
    pipe = loaded.pipe
    positive = denoise.with_size(pipe, denoise.encode_prompt(pipe, prompt, insert), size)
    if not denoise.uses_cfg(pipe.unet):
        return positive, positive
    return positive, denoise.with_size(pipe, denoise.encode_prompt(pipe, negative_prompt, insert), size)


def evaluations(loaded: LoadedPipeline, steps: int) -> int:
    """How many passes the loop makes for `steps` (the scheduler's timesteps: PNDM's first step takes two);
    LoRA Switch counts these passes."""
    scheduler = denoise.fresh_scheduler(loaded.pipe)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


@torch.no_grad()
def render_composed(loaded: LoadedPipeline, attached: list[Attached], weights: list[float], options: SampleOptions,
                    size: tuple[int, int], progress_bar: bool = False,
                    embeddings: list[Attached] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latents, image [H, W, 3] on 0–255) with the LoRAs and embeddings (each at its weight in
    `options.embeddings`) hooked in; they are removed afterwards."""
    handles = [one.hook() for one in attached]
    for one, (_, weight) in zip(embeddings, options.embeddings):
        one.hook().multiplier = weight
    try:
        insert = inserts(list(embeddings))
        set_active(handles, weights, list(range(len(handles))))
        with_loras = encode_pair(loaded, options.prompt, options.negative_prompt, size, insert)
        without = None
        if options.composition.autolora is not None:
            set_active(handles, weights, [])
            without = encode_pair(loaded, options.prompt, options.negative_prompt, size, insert)
        predict = composed(loaded.pipe.unet, handles, weights, options.composition, with_loras, without)
        noise = denoise.seeded_noise(loaded.pipe, size, options.seed)
        total = evaluations(loaded, options.steps)
        with tqdm(total=total, desc="sample", unit="step", disable=None if progress_bar else True) as bar:
            def counted(step: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                prediction = predict(step, latents, t)
                bar.update()
                return prediction

            return denoise.render(loaded.pipe, noise, options.steps, counted)
    finally:
        for one in [*attached, *embeddings]:
            one.remove()


def _quoted(value: object) -> str:
    """A1111 reads `Key: value, ...`: a value holding ',', ':' or a newline is written as a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _parameters_text(options: SampleOptions, checkpoint: Path, size: tuple[int, int], loaded: LoadedPipeline,
                     sha256: Callable[[Path], str], device: torch.device, dtype: torch.dtype) -> str:
    composition = options.composition
    model_sha = digest_of(sha256(checkpoint))
    lora_shas = [digest_of(sha256(path)) for path, _ in options.loras]
    embedding_shas = [digest_of(sha256(path)) for path, _ in options.embeddings]
    facts = denoise.sampler_facts(loaded.pipe)
    fields = {
        "Steps": options.steps, "Sampler": facts["sampler"],
        **guidance_text({k: v for k, v in guidance_parameters(loaded.pipe).items() if k != "negative_prompt"}),
        **({"Shift": facts["shift"]} if facts["shift"] is not None else {}),
        "Seed": options.seed, "Size": f"{size[0]}x{size[1]}",
        "Model": checkpoint.name, "Model hash": autov2(model_sha), "Model SHA256": model_sha,
        "Lora hashes": resource_hashes([(path.name, sha) for (path, _), sha in zip(options.loras, lora_shas)]),
        "LoRAs": ", ".join(f"{path.name}:{weight:g}" for path, weight in options.loras),
        "LoRA SHA256": ", ".join(lora_shas),
        "Compose": composition.mode,
    }
    if not options.loras:
        for key in ("Lora hashes", "LoRAs", "LoRA SHA256", "Compose"):
            del fields[key]
    if options.embeddings:  # A1111 names an embedding by its file's stem in `TI hashes`
        fields.update({"TI hashes": resource_hashes([(path.name, sha) for (path, _), sha
                                                      in zip(options.embeddings, embedding_shas)]),
                       "Embeddings": ", ".join(f"{path.name}:{weight:g}" for path, weight in options.embeddings),
                       "Embedding SHA256": ", ".join(embedding_shas)})
    if composition.mode == "switch":
        fields["Switch every"] = composition.switch_every
    if composition.autolora is not None:
        fields["AutoLoRA"] = f"{composition.autolora:g}"
    fields.update({"Device": device.type, "Dtype": str(dtype).removeprefix("torch."),
                   "Version": versions_text({"adapterzoo": __version__, "diffusers": diffusers.__version__,
                                             "transformers": transformers.__version__, "torch": torch.__version__})})
    return a1111_text(options.prompt, {k: _quoted(v) for k, v in fields.items()}, options.negative_prompt)


def sample(checkpoint: Path, options: SampleOptions, output: Path, sha256: Callable[[Path], str],
           force: bool = False, progress_bar: bool = False) -> dict:
    """Render one image to `output` (PNG); the report `sample --json` prints. AdapterzooError for bad input."""
    start = time.monotonic()
    checkpoint = Path(checkpoint)
    files = [Path(path) for path, _ in options.loras]
    weights = [weight for _, weight in options.loras]
    embedding_files = [Path(path) for path, _ in options.embeddings]
    if not files and not embedding_files:
        raise AdapterzooError("give a LoRA (--lora) or an embedding (--embedding) to sample with")
    if not files and (options.composition.mode != "merge" or options.composition.autolora is not None):
        raise AdapterzooError("--compose switch|composite and --autolora compose LoRAs: give --lora")
    output = check_output(output, [checkpoint, *files, *embedding_files], force, suffix=".png")
    refuse_parts(checkpoint, options.parts)
    loaded = load_for_sampling(checkpoint, options.device, options.dtype, options.parts)
    device, dtype = loaded.pipe.device, loaded.pipe.unet.dtype
    size = options.size or native_size(loaded)
    check_size(loaded, size)
    cfg = denoise.uses_cfg(loaded.pipe.unet)
    if options.negative_prompt and not cfg:
        raise AdapterzooError(f"--negative-prompt: {checkpoint.name} renders without classifier-free guidance "
                              f"({', '.join(f'{k} {v}' for k, v in guidance_parameters(loaded.pipe).items())}), "
                              "so a negative prompt would change nothing")
    options = replace(options, steps=options.steps or default_steps(loaded.pipe))
    attached = attach_loras(loaded, files, checkpoint, options.allow_unmatched)
    embeddings = attach_loras(loaded, embedding_files, checkpoint, options.allow_unmatched, (EMBEDDING_KIND,))
    _, image = render_composed(loaded, attached, weights, options, size, progress_bar, embeddings)
    problem = measure.image_problem(image, loaded.base, loaded.pipe.vae.dtype)
    unused = [f"{path.name}: its token {one.token!r} is in neither prompt, so it changes nothing"
              for (path, _), one in zip(options.embeddings, embeddings)
              if one.token not in options.prompt and one.token not in options.negative_prompt]
    pixels = image.nan_to_num(0.0).clamp(0, 255).to(torch.uint8).numpy()
    save_png(output, Image.fromarray(pixels, "RGB"),
             _parameters_text(options, checkpoint, size, loaded, sha256, device, dtype))
    composition = options.composition
    report = {
        "output": str(output), "seconds": round(time.monotonic() - start, 3), "compose": composition.mode,
        "loras": [{"file": str(path), "weight": weight, "modules": one.coverage["modules_total"],
                   "modules_hit": sum(1 for calls in one.handle.calls.values() if calls > 0),
                   "unmatched": one.coverage["unmatched"]}
                  for (path, weight), one in zip(options.loras, attached)],
        "embeddings": [{"file": str(path), "token": one.token, "weight": weight, "slots": one.coverage["modules_total"],
                        "slots_hit": sum(1 for calls in one.handle.calls.values() if calls > 0),
                        "unmatched": one.coverage["unmatched"]}
                       for (path, weight), one in zip(options.embeddings, embeddings)],
    }
    if composition.mode == "switch":
        report["switch_every"] = composition.switch_every
        report["schedule"] = switch_schedule(evaluations(loaded, options.steps), len(files), composition.switch_every)
    report.update({"autolora": composition.autolora, "checkpoint": str(checkpoint), "base": loaded.base,
                   "prompt": options.prompt,
                   **guidance_parameters(loaded.pipe), **({"negative_prompt": options.negative_prompt} if cfg else {}),
                   "seed": options.seed,
                   "steps": options.steps, "size": list(size), "device": device.type,
                   "dtype": str(dtype).removeprefix("torch."), "warnings": unused + ([problem] if problem else [])})
    return report
