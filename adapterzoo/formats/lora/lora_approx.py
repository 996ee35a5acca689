"""Turn a LoHa / LoKr / full module into a rank-N LoRA: the best one (Eckart–Young), lossy and reported.

Used only when a user asks for a plain-LoRA dialect with an explicit rank; the retained Frobenius
fraction √(Σ_kept σ² / ‖ΔW‖_F²) says how much of ΔW survived. The SVD comes from the module's
structure (`delta_svd`): exact, in milliseconds, without forming ΔW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapterzoo.formats.lora.delta_svd import module_dtype, module_svd
from adapterzoo.formats.lora.lora_model import AdapterModule, FullModule, LohaModule, LokrModule, LoraModule


@dataclass(frozen=True)
class Approximation:
    module: LoraModule
    kept: float  # Σ of the kept σ²
    total: float  # ‖ΔW‖_F²

    @property
    def retained(self) -> float:
        return math.sqrt(min(1.0, self.kept / self.total)) if self.total > 0 else 1.0


def approximate(module: LohaModule | LokrModule | FullModule, rank: int) -> Approximation:
    """Best rank-`rank` LoRA (scale 1) of the module's scale·ΔW; a DoRA scale is kept as is."""
    svd = module_svd(module, wanted=rank)
    k = min(rank, len(svd.s))
    up, down = svd.factors(k)
    shape, dtype = module.shape, module_dtype(module)
    up = up.reshape(shape[0], k, *([1, 1] if len(shape) == 4 else [])).to(dtype)
    down = down.reshape(k, *shape[1:]).to(dtype)
    dora = None if isinstance(module, FullModule) else module.dora_scale
    return Approximation(LoraModule(down, up, float(k), shape, None, dora), svd.kept_energy(k), svd.energy)


def bias_left_out(modules: list[AdapterModule]) -> str | None:
    """The warning when full modules that also change their layer's bias (diff_b) become LoRAs, which carry none
    (a norm layer's, 1-D, stays a full module)."""
    biased = sum(isinstance(m, FullModule) and m.diff_b is not None and len(m.shape) > 1 for m in modules)
    if not biased:
        return None
    return f"{biased} full module(s) also change a bias (diff_b); a LoRA carries no bias, so that part is left out"
