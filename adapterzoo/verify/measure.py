"""The numbers a verdict is made of (SAMPLING.md §5): pixel change, noise-prediction change, sanity."""

from __future__ import annotations

import torch

from adapterzoo.formats.model.registry import family_of

# Floors at multiplier 1. Float noise between two renders of the same thing is 0 on one device
# (deterministic kernels) and ~1e-4 relative across kernels; a weak real rank-4 LoRA moves the
# noise prediction of a random-weight SD1.5 by ~1e-2 and its pixels by far more than 0.1/255.
NOISE_FLOOR = 1e-3
PIXEL_FLOOR = 0.1
BLACK_LEVEL = 2.0  # 0..255: every channel of every pixel at or below this is a black image


def mean_abs_pixel_change(images: list[torch.Tensor], baselines: list[torch.Tensor]) -> float:
    """Mean |image − baseline| over every pixel and channel of every pair, on the 0–255 scale."""
    return float(torch.stack([(a - b).abs().mean() for a, b in zip(images, baselines)]).mean())


def relative_change(prediction: torch.Tensor, baseline: torch.Tensor) -> float:
    """‖ε_m − ε_0‖ / ‖ε_0‖ in float64."""
    return float((prediction.double() - baseline.double()).norm() / baseline.double().norm())


def finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def single_colour(image: torch.Tensor) -> bool:
    flat = image.reshape(-1, image.shape[-1])
    return bool((flat == flat[0]).all())


def black(image: torch.Tensor) -> bool:
    return bool((image.nan_to_num(0.0) <= BLACK_LEVEL).all())


def image_problem(image: torch.Tensor, base: str, vae_dtype: torch.dtype) -> str | None:
    """Why an image is unusable: NaN/inf, an fp16 VAE's black image where the family knows it (with the cure),
    one colour."""
    family = family_of(base)
    sampling = family.sampling if family is not None else None
    if sampling and base in sampling.vae_fp32 and vae_dtype == torch.float16 and (not finite(image) or black(image)):
        return sampling.vae_fp16_black
    if not finite(image):
        return "the image holds NaN or inf"
    if single_colour(image):
        return "the image is a single colour"
    return None
