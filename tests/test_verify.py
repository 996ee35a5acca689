"""`verify`: adapters applied at run time must equal diffusers' own loader (or merged weights), leave the
model bit-identical at multiplier 0, and every file that does nothing must fail with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapterzoo import tiny_models
from adapterzoo.formats.architectures import architecture_from_models
from adapterzoo.formats.lora_read import load_lora_matched
from adapterzoo.verify import denoise
from adapterzoo.verify.runtime_lora import apply_lora, live_modules

SIZE = (64, 64)
PROMPT = "a photo of a cat"
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def components(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


def kohya_file(pipe, base: str, path: Path, std: float = 0.1, zero_up: bool = False) -> Path:
    """A kohya LoRA on every Linear / Conv2d of the tiny model (alpha 2, rank 4)."""
    arch = architecture_from_models(base, components(pipe))
    g = torch.Generator().manual_seed(3)
    sd = {}
    for target in arch.targets.values():
        if len(target.shape) < 2 or "embedding" in target.path or "text_projection" in target.path:
            continue
        name = arch.kohya_name(target)
        tail = target.shape[2:]
        sd[f"{name}.lora_down.weight"] = torch.randn(4, *target.shape[1:], generator=g) * std
        up = torch.randn(target.shape[0], 4, *(1,) * len(tail), generator=g) * std
        sd[f"{name}.lora_up.weight"] = torch.zeros_like(up) if zero_up else up
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
    return path


def noise_prediction(pipe, prompt: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        cond = denoise.with_size(pipe, denoise.encode_prompt(pipe, prompt), SIZE)
        return denoise.unet_prediction(pipe.unet, denoise.seeded_noise(pipe, SIZE, 0), torch.tensor(500), cond)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("base", ["sd1", "sdxl"])
def test_kohya_at_run_time_equals_diffusers_load_lora_weights(base, tmp_path):
    pipe = tiny_models.tiny_pipeline(base, 1)
    lora_path = kohya_file(pipe, base, tmp_path / "kohya.safetensors")
    baseline = noise_prediction(pipe)
    lora, unmatched = load_lora_matched(lora_path, architecture_from_models(base, components(pipe)))
    assert unmatched == []
    applied = apply_lora(lora, live_modules(components(pipe), lora.architecture, list(lora.modules)), 0.7)
    ours = noise_prediction(pipe)
    applied.multiplier = 0.0
    assert torch.equal(noise_prediction(pipe), baseline)
    applied.remove()
    assert torch.equal(noise_prediction(pipe), baseline)
    assert all(calls > 0 for calls in applied.calls.values())

    pipe.load_lora_weights(str(lora_path), adapter_name="k")
    pipe.set_adapters(["k"], [0.7])
    theirs = noise_prediction(pipe)
    assert relative(theirs, baseline) > 0.05
    assert relative(ours, theirs) < TOLERANCE
