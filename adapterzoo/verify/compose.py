"""Several LoRAs in one render (SAMPLING.md §4): merge, LoRA Switch, LoRA Composite, and AutoLoRA's γ-mix.

All four only change which run-time hooks are live (their multipliers) around each UNet call, so they
share the verifier's engine: `runtime_lora` hooks and `denoise`'s own loop, which lets a step's noise
prediction be anything. Text-encoder LoRAs act merge-style in every mode: the prompt is encoded once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterzoo.verify.denoise import Conditioning, NoisePrediction, guided
from adapterzoo.verify.runtime_lora import AppliedLora

MODES = ("merge", "switch", "composite")
DEFAULT_SWITCH_EVERY = 5  # τ of the reference code


@dataclass
class Composition:
    """How the LoRAs share the steps; `autolora` (γ) mixes that prediction with the model without them."""

    mode: str = "merge"
    switch_every: int = DEFAULT_SWITCH_EVERY
    autolora: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.switch_every < 1:
            raise ValueError("switch_every must be at least 1")


def switch_index(step: int, count: int, every: int) -> int:
    """LoRA Switch's active LoRA at 0-based `step`: ⌊step/τ⌋ mod k (the reference code's callback gives the
    first LoRA τ+1 steps; this is the paper's clean cycle)."""
    return (step // every) % count


def switch_schedule(steps: int, count: int, every: int) -> list[int]:
    return [switch_index(step, count, every) for step in range(steps)]


def set_active(handles: list[AppliedLora], weights: list[float], active: list[int]) -> None:
    """LoRA i at its weight when i is active, else at 0 (its hooks then leave outputs untouched)."""
    for i, handle in enumerate(handles):
        handle.multiplier = weights[i] if i in active else 0.0


def composed(unet: torch.nn.Module, handles: list[AppliedLora], weights: list[float], composition: Composition,
             with_loras: tuple[Conditioning, Conditioning], without: tuple[Conditioning, Conditioning] | None = None
             ) -> NoisePrediction:
    """The guided noise prediction per step. `with_loras` / `without`: (positive, negative) encoded with every
    LoRA on / off; `without` is needed for AutoLoRA only: ε̂ = ε̃_base + γ·(ε̃_LoRAs − ε̃_base), where
    ε̃_LoRAs is what `composition.mode` predicts."""
    everyone = list(range(len(handles)))
    lora_guided = guided(unet, *with_loras)

    def one(active: list[int], step: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        set_active(handles, weights, active)
        return lora_guided(step, latents, t)

    def loras(step: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if composition.mode == "merge":
            return one(everyone, step, latents, t)
        if composition.mode == "switch":
            return one([switch_index(step, len(handles), composition.switch_every)], step, latents, t)
        return torch.stack([one([i], step, latents, t) for i in everyone]).mean(dim=0)

    if composition.autolora is None:
        return loras
    if without is None:
        raise ValueError("AutoLoRA needs the prompt encoded without the LoRAs")
    base_guided = guided(unet, *without)
    gamma = composition.autolora

    def mixed(step: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        set_active(handles, weights, [])
        base = base_guided(step, latents, t)
        return base + gamma * (loras(step, latents, t) - base)

    return mixed
