"""Turn a LoHa / LoKr / full module into a rank-N LoRA by truncated SVD of its ΔW (lossy, reported).

Used only when a user asks for a plain-LoRA dialect with an explicit rank; the retained Frobenius
fraction √(Σ_kept σ² / Σ σ²) says how much of ΔW survived.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterzoo.formats.lora.lora_model import FullModule, LohaModule, LokrModule, LoraModule


@dataclass(frozen=True)
class Approximation:
    module: LoraModule
    kept: float  # Σ of the kept σ²
    total: float  # Σ σ² = ‖ΔW‖_F²

    @property
    def retained(self) -> float:
        return math.sqrt(self.kept / self.total) if self.total > 0 else 1.0


def approximate(module: LohaModule | LokrModule | FullModule, rank: int) -> Approximation:
    """Best rank-`rank` LoRA (scale 1) of the module's scale·ΔW; a DoRA scale is kept as is."""
    delta = module.scaled_delta()
    shape = module.shape
    u, s, vh = torch.linalg.svd(delta.reshape(shape[0], -1), full_matrices=False)
    k = min(rank, s.numel())
    dtype = (module.diff if isinstance(module, FullModule) else _first_factor(module)).dtype
    up = (u[:, :k] * s[:k]).reshape(shape[0], k, *([1, 1] if len(shape) == 4 else [])).to(dtype)
    down = vh[:k].reshape(k, *shape[1:]).to(dtype)
    dora = None if isinstance(module, FullModule) else module.dora_scale
    energy = s.double().pow(2)
    return Approximation(LoraModule(down, up, float(k), shape, None, dora), float(energy[:k].sum()),
                         float(energy.sum()))


def _first_factor(module: LohaModule | LokrModule) -> torch.Tensor:
    if isinstance(module, LohaModule):
        return module.w1_a
    return next(t for t in (module.w1, module.w1_a, module.w2, module.w2_a) if t is not None)
