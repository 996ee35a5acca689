"""Our own denoising loop over a diffusers pipeline's parts (SAMPLING.md §4).

A pipeline callback cannot replace the noise prediction, and LoRA Switch / Composite / AutoLoRA
must, so prompt encoding, latents, classifier-free guidance, `scheduler.step` and VAE decoding are
plain functions here; `render` takes the noise prediction as a function of (step, latents, t).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

GUIDANCE_SCALE = 7.0
NEGATIVE_PROMPT = ""
# an embedding's placeholder ids count down from here, one per vector and embedding: no tokenizer's id (CLIP's "!"
# is 0, T5's pad is 0 and its EOS 1), below every EOS id so CLIP's pooling never picks one; the embedding's hook
# swaps them for a real id before the lookup and puts its vectors in their places after it
PLACEHOLDER_ID = -1
Insert = dict[str, dict[str, list[int]]]  # text encoder -> {prompt word: its placeholder ids}; [] takes it out


@dataclass
class Conditioning:
    """What the UNet needs besides latents and t: token states, and SDXL's pooled text + size ids."""

    states: torch.Tensor  # [1, 77, context]
    added: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL: text_embeds, time_ids; a DiT: its own

    def batched(self, other: Conditioning) -> Conditioning:
        """[self, other] along the batch: one UNet call for both halves of a CFG pair."""
        added = {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Conditioning(torch.cat([self.states, other.states]), added)


NoisePrediction = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (step, latents, t) -> eps


def text_encoders(pipe) -> list[tuple[str, object, torch.nn.Module]]:
    """(name, tokenizer, text encoder) in the order the pipeline concatenates their states."""
    names = ["text_encoder"] + (["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) is not None else [])
    return [(name, getattr(pipe, name.replace("text_encoder", "tokenizer")), getattr(pipe, name)) for name in names]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a prompt's own (CLIP: BOS and EOS; T5: EOS only)."""
    bare = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    at = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:at], full[at + len(bare):]


def _tokens(tokenizer, prompt: str, insert: dict[str, list[int]] | None, length: int | None) -> tuple[list[int], int]:
    """(the padded ids, how many of them are the prompt's and the tokenizer's own rather than padding)."""
    pieces: list[tuple[str, list[int]]] = [(prompt, [])]
    for word, placeholders in (insert or {}).items():
        split: list[tuple[str, list[int]]] = []
        for text, after in pieces:
            parts = text.split(word)
            for i, part in enumerate(parts):
                split.append((part, list(placeholders) if i < len(parts) - 1 else after))
        pieces = split
    ids: list[int] = []
    for text, placeholders in pieces:
        ids += tokenizer(text.strip(), add_special_tokens=False).input_ids if text.strip() else []
        ids += placeholders
    limit = length or tokenizer.model_max_length
    before, after = special_tokens(tokenizer)
    ids = before + ids[: limit - len(before) - len(after)] + after
    count = len(ids)
    return ids + [tokenizer.pad_token_id] * (limit - count), count


def token_ids(tokenizer, prompt: str, insert: dict[str, list[int]] | None = None,
              length: int | None = None) -> torch.Tensor:
    """[1, length] ids as `tokenizer(prompt, padding="max_length", truncation=True)` gives them (the tokenizer's own
    special tokens, its pad id; `length` defaults to its model_max_length); each word of `insert` becomes its
    placeholder ids ([]: the word is taken out). The text between words is tokenized apart, stripped, as a
    tokenizer extended by the words as added tokens (lstrip) splits it."""
    return torch.tensor([_tokens(tokenizer, prompt, insert, length)[0]])


def token_mask(tokenizer, prompt: str, insert: dict[str, list[int]] | None = None,
               length: int | None = None) -> torch.Tensor:
    """[1, length] attention mask of `token_ids`' ids, as the tokenizer gives it: 1 for the prompt's tokens (an
    embedding's placeholders among them) and the tokenizer's own special ones, 0 for the padding; told apart by
    position, since a CLIP tokenizer pads with its EOS."""
    count = _tokens(tokenizer, prompt, insert, length)[1]
    return (torch.arange(length or tokenizer.model_max_length) < count).long()[None]


@torch.no_grad()
def encode_prompt(pipe, prompt: str, insert: Insert | None = None) -> Conditioning:
    """What the diffusers pipeline computes for one prompt (no clip skip); SDXL's empty prompt is zeros. `insert`
    says, per text encoder, which words become an embedding's placeholders in that encoder's tokens."""
    insert = insert or {}
    device = pipe.unet.device
    if hasattr(pipe, "encode_conditioning"):  # a DiT family's own text encoders (CLIP pooled + T5 states)
        def ids(encoder: str, length: int | None = None, mask: bool = False) -> torch.Tensor:
            tokenizer = getattr(pipe, encoder.replace("text_encoder", "tokenizer"))
            return (token_mask if mask else token_ids)(tokenizer, prompt, insert.get(encoder), length)

        states, added = pipe.encode_conditioning(prompt, ids)
        return Conditioning(states, added)
    encoders = text_encoders(pipe)
    if len(encoders) == 1:
        name, tokenizer, encoder = encoders[0]
        return Conditioning(encoder(token_ids(tokenizer, prompt, insert.get(name)).to(device))[0])
    if prompt == "" and pipe.config.get("force_zeros_for_empty_prompt", True):
        positive = encode_prompt(pipe, " ", insert)
        return Conditioning(torch.zeros_like(positive.states),
                            {k: torch.zeros_like(v) if k == "text_embeds" else v for k, v in positive.added.items()})
    states = []
    pooled = None
    for name, tokenizer, encoder in encoders:
        out = encoder(token_ids(tokenizer, prompt, insert.get(name)).to(device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    return Conditioning(torch.cat(states, dim=-1), {"text_embeds": pooled})


def with_size(pipe, cond: Conditioning, size: tuple[int, int]) -> Conditioning:
    """SDXL's micro-conditioning: original size, crop (0, 0), target size, as (H, W) pairs."""
    if "text_embeds" not in cond.added:
        return cond
    width, height = size
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.states.dtype, device=cond.states.device)
    return Conditioning(cond.states, {**cond.added, "time_ids": ids})


def vae_factor(vae) -> int:
    """How many pixels a latent spans, per side: the `latent_factor` a VAE declares whose latents reach the loop
    patched (Flux.2's 2×2 patches: 16); a video VAE (diffusers' 3D causal kind) lists its downsamplings in
    `temperal_downsample` (True where time halves too); an image VAE halves the size at each level after the first."""
    if getattr(vae, "latent_factor", None):
        return vae.latent_factor
    video = getattr(vae.config, "temperal_downsample", None)
    return 2 ** len(video) if video is not None else 2 ** (len(vae.config.block_out_channels) - 1)


def size_step(pipe) -> tuple[int, int]:
    """(VAE factor, latent patch): an image side must be a multiple of their product; a denoiser that packs
    p×p latent patches into tokens declares `patch = p`."""
    return vae_factor(pipe.vae), getattr(pipe.unet, "patch", 1)


def latent_shape(pipe, size: tuple[int, int]) -> tuple[int, int, int, int]:
    factor, patch = size_step(pipe)
    width, height = size
    if width % (factor * patch) or height % (factor * patch):
        raise ValueError(f"the size must be a multiple of {factor * patch}")
    return 1, pipe.unet.config.in_channels, height // factor, width // factor


def seeded_noise(pipe, size: tuple[int, int], seed: int) -> torch.Tensor:
    """Unit Gaussian latents drawn on the CPU, so a seed gives the same picture on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(latent_shape(pipe, size), generator=generator, dtype=torch.float32)
    return noise.to(pipe.unet.device, pipe.unet.dtype)


def unet_prediction(unet, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    batch = cond.states.shape[0]
    x = latents.expand(batch, *latents.shape[1:]) if latents.shape[0] != batch else latents
    kwargs = {"added_cond_kwargs": cond.added} if cond.added else {}
    return unet(x, t, encoder_hidden_states=cond.states, **kwargs, return_dict=False)[0]


def uses_cfg(unet) -> bool:
    """Whether the denoiser is guided by a CFG pair; a model whose guidance is distilled into it (or that has
    none) declares `cfg = False`."""
    return getattr(unet, "cfg", True)


def cfg_scale(unet) -> float:
    """The CFG scale w of ε∅ + w·(ε_c − ε∅): the denoiser's own where its family's pipeline renders with
    another (`cfg_scale`), else GUIDANCE_SCALE."""
    return getattr(unet, "cfg_scale", GUIDANCE_SCALE)


def cfg_combined(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def guided(unet, positive: Conditioning, negative: Conditioning) -> NoisePrediction:
    """Classifier-free guidance with one batched UNet call per step: ε∅ + w·(ε_c − ε∅), w the denoiser's
    (`cfg_scale`), or the denoiser's own `combine(ε∅, ε_c, w)` where its pipeline adjusts that (a rescale); a
    model whose guidance is distilled into it (or that has none) declares `cfg = False` and is called once,
    positive only."""
    if not uses_cfg(unet):
        return lambda step, latents, t: unet_prediction(unet, latents, t, positive)
    scale = cfg_scale(unet)
    combine = getattr(unet, "combine", cfg_combined)
    pair = negative.batched(positive)

    def predict(step: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond, cond = unet_prediction(unet, torch.cat([latents, latents]), t, pair).chunk(2)
        return combine(uncond, cond, scale)

    return predict


def sampler_facts(pipe) -> dict[str, Any]:
    """What a render records of its sampler: the scheduler's class (a wrapper's inner one) and a flow-matching
    scheduler's fixed shift (None where it has none or the shift follows the image size)."""
    scheduler = getattr(pipe.scheduler, "inner", pipe.scheduler)
    config = scheduler.config
    return {"sampler": type(scheduler).__name__,
            "shift": None if config.get("use_dynamic_shifting") else config.get("shift")}


def fresh_scheduler(pipe):
    """A new scheduler from the pipeline's config: schedulers keep per-run state (step index, PNDM history);
    a wrapper that carries more than a config (a family's flow-matching steps) makes its own."""
    if hasattr(pipe.scheduler, "fresh"):
        return pipe.scheduler.fresh()
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


def _scheduler(pipe, steps: int, latents: torch.Tensor) -> Any:
    """A fresh scheduler set for `steps` steps over `latents` (a flow-matching shift depends on their size)."""
    scheduler = fresh_scheduler(pipe)
    if hasattr(scheduler, "fit_to"):
        scheduler.fit_to(latents)
    scheduler.set_timesteps(steps, device=latents.device)
    return scheduler


def schedule(pipe, steps: int, size: tuple[int, int]) -> list[float]:
    """The timesteps `denoise` runs for `steps` steps at `size` (a flow-matching family's spacing and shift
    included): part of what a cached render depends on."""
    return [float(t) for t in _scheduler(pipe, steps, torch.empty(latent_shape(pipe, size))).timesteps]


@torch.no_grad()
def denoise(pipe, noise: torch.Tensor, steps: int, predict: NoisePrediction) -> torch.Tensor:
    """Run the scheduler from `noise` for `steps` steps; returns the final latents."""
    scheduler = _scheduler(pipe, steps, noise)
    latents = noise * scheduler.init_noise_sigma
    for step, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(predict(step, model_input, t), t, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> [H, W, 3] uint8 on the CPU, the VAE run in its own dtype; NaN stays visible as NaN floats."""
    if getattr(vae.config, "temperal_downsample", None) is not None:
        return _decoded(_video_decode(vae, latents))
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    return _decoded(vae.decode(scaled, return_dict=False)[0][0])


def _video_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """A video VAE's one frame: [B, C, h, w] latents un-normalised per channel (its `latents_mean` and
    `latents_std`, as the pipelines that use one compute it) and decoded as a clip of one frame."""
    config = vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, vae.dtype)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, vae.dtype)
    clip = latents.to(vae.dtype)[:, :, None] / inverse_std + mean
    return vae.decode(clip, return_dict=False)[0][0, :, 0]


def _decoded(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] on -1..1 -> [H, W, 3] on 0..255, rounded, on the CPU."""
    return ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 0).cpu()


@torch.no_grad()
def render(pipe, noise: torch.Tensor, steps: int, predict: NoisePrediction,
           vae=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latents, decoded image as float 0..255 [H, W, 3]) — `vae` defaults to the pipeline's."""
    latents = denoise(pipe, noise, steps, predict)
    return latents, decode(vae if vae is not None else pipe.vae, latents)
