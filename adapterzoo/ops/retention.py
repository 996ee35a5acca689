"""How much of a whole file's ΔW a lossy operation kept: one number from many modules' truncations."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Retention:
    """Running √(Σ kept ‖ΔW_k‖² / Σ ‖ΔW‖²) over modules, so large modules weigh as much as they change."""

    kept: float = 0.0
    total: float = 0.0

    def add(self, retained_fro: float, energy: float) -> None:
        """One module: its retained Frobenius fraction and its ‖ΔW‖_F²."""
        self.kept += retained_fro * retained_fro * energy
        self.total += energy

    @property
    def fraction(self) -> float:
        return math.sqrt(self.kept / self.total) if self.total > 0 else 1.0
