"""Low-rank algebra on LoRA factors: resize, exact and SVD merges, extraction (FORMATS.md §1.1, §1.5).

Factors follow the canonical form: `up` [out, r] or [out, r, 1, 1], `down` [r, in] or [r, in, k, k],
optional Tucker `mid` [r, r, k, k]; ΔW = scale · up @ down. Truncations never form the out x in matrix
when the factors are thin: QR of both factors leaves an r x r core whose SVD is the SVD of ΔW.
Everything is computed in fp32 on the device the inputs live on; results stay there, in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterzoo.errors import AdapterzooError

# Extra directions sampled beyond the wanted rank, and power iterations, of the randomized SVD in extract.
_OVERSAMPLE = 10
_POWER_ITERATIONS = 4
# A randomized SVD pays off only when it samples a small fraction of the matrix's smaller side.
_RANDOMIZED_MAX_FRACTION = 0.125


@dataclass(frozen=True)
class Rank:
    """Keep the n largest singular values (fewer if ΔW has fewer)."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise AdapterzooError(f"--rank must be at least 1, got {self.n}")


@dataclass(frozen=True)
class SvRatio:
    """Keep every σ_i >= σ_max / x (kohya resize_lora's sv_ratio)."""

    x: float

    def __post_init__(self) -> None:
        if not self.x >= 1:
            raise AdapterzooError(f"--sv-ratio must be at least 1, got {self.x}")


@dataclass(frozen=True)
class SvFro:
    """Smallest rank whose retained Frobenius fraction √(Σ_kept σ² / Σ σ²) is at least x."""

    x: float

    def __post_init__(self) -> None:
        if not 0 < self.x <= 1:
            raise AdapterzooError(f"--sv-fro must be in (0, 1], got {self.x}")


@dataclass(frozen=True)
class SvCumulative:
    """Smallest rank whose share of the singular-value sum Σ_kept σ / Σ σ is at least x."""

    x: float

    def __post_init__(self) -> None:
        if not 0 < self.x <= 1:
            raise AdapterzooError(f"--sv-cumulative must be in (0, 1], got {self.x}")


Rule = Rank | SvRatio | SvFro | SvCumulative


@dataclass(frozen=True)
class Truncation:
    """A rank-`kept_rank` ΔW_k = up @ down, with every scale and weight already folded in.

    Store it with alpha = kept_rank (file scale 1), or use `factors_for_alpha` to keep another alpha.
    The singular value is split as √σ on both factors, which keeps fp16 storage well inside its range.
    `retained_fro` = ‖ΔW_k‖_F / ‖ΔW‖_F; `sv` holds ΔW's singular values in descending order (all of
    them, except after a randomized extract, which computes only the leading ones).
    """

    up: torch.Tensor
    down: torch.Tensor
    kept_rank: int
    retained_fro: float
    sv: torch.Tensor

    def factors_for_alpha(self, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) to write beside `alpha` so that alpha / kept_rank · up @ down still equals ΔW_k."""
        if not alpha > 0:
            raise AdapterzooError(f"alpha must be positive, got {alpha}")
        root = math.sqrt(self.kept_rank / alpha)
        return self.up * root, self.down * root


def delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """up @ down (without scale) in fp32, shaped like the target weight: [out, in] or [out, in, k, k]."""
    up2 = up.float().reshape(up.shape[0], -1)
    if mid is not None:
        return torch.einsum("oa,abhw,bi->oihw", up2, mid.float(), down.float().reshape(down.shape[0], -1))
    return (up2 @ down.float().reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])


def fold_tucker(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """Tucker (mid [r, r, k, k], 1x1 down) to a plain k x k down [r, in, k, k] with the same ΔW."""
    return torch.einsum("abhw,bi->aihw", mid.float(), down.float().reshape(down.shape[0], -1))


def _select_rank(rule: Rule, sv: list[float]) -> int:
    """How many leading singular values the rule keeps (at least 1, at most len(sv))."""
    if isinstance(rule, Rank):
        return min(rule.n, len(sv))
    if isinstance(rule, SvRatio):
        return max(1, sum(1 for s in sv if s >= sv[0] / rule.x))
    if isinstance(rule, SvFro):
        values, target = [s * s for s in sv], rule.x * rule.x
    else:
        values, target = sv, rule.x
    total, running = sum(values), 0.0
    for kept, value in enumerate(values, start=1):
        running += value
        if running >= target * total:
            return kept
    return len(sv)


def _keep(rule: Rule, s: torch.Tensor, energy: float | None = None) -> tuple[int, float]:
    """(kept rank, retained Frobenius fraction) for singular values `s`, which must not be all zero.

    `energy` is ‖ΔW‖_F² when `s` holds only the leading singular values; by default Σ s².
    """
    values = s.tolist()
    kept = _select_rank(rule, values)
    squares = [v * v for v in values]
    total = sum(squares) if energy is None else energy
    return kept, min(1.0, math.sqrt(sum(squares[:kept]) / total))


def _balanced(left: torch.Tensor, s: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """left · diag(s) · right as (up, down) with √σ on each side."""
    root = s.sqrt()
    return left * root, root[:, None] * right


def _shaped(up2: torch.Tensor, down2: torch.Tensor, up_tail: tuple[int, ...], down_tail: tuple[int, ...]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Give 2-D factors the layout of the originals: [out, r(, 1, 1)] and [r, in(, k, k)]."""
    return (up2.reshape(up2.shape[0], up2.shape[1], *up_tail),
            down2.reshape(down2.shape[0], *down_tail))


def _zero(out: int, inner: int, device: torch.device, up_tail: tuple[int, ...], down_tail: tuple[int, ...],
          sv: torch.Tensor) -> Truncation:
    """An all-zero ΔW stays a rank-1 zero module, so a resized file keeps the same module set."""
    up, down = _shaped(torch.zeros(out, 1, device=device), torch.zeros(1, inner, device=device), up_tail, down_tail)
    return Truncation(up, down, 1, 1.0, sv)


def _check_finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise AdapterzooError("the weights contain NaN or infinite values; nothing sensible can be computed")


def _truncate_flat(up2: torch.Tensor, down2: torch.Tensor, rule: Rule, up_tail: tuple[int, ...],
                   down_tail: tuple[int, ...]) -> Truncation:
    """Eckart–Young truncation of up2 @ down2 (2-D, fp32) through QR of both factors."""
    q_up, r_up = torch.linalg.qr(up2)
    q_down, r_down = torch.linalg.qr(down2.T)
    core = r_up @ r_down.T
    _check_finite(core)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    if not bool(s[0] > 0):
        return _zero(up2.shape[0], down2.shape[1], up2.device, up_tail, down_tail, s)
    kept, retained = _keep(rule, s)
    up_k, down_k = _balanced(q_up @ u[:, :kept], s[:kept], vh[:kept] @ q_down.T)
    return Truncation(*_shaped(up_k, down_k, up_tail, down_tail), kept, retained, s)


def _from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rule: Rule, up_tail: tuple[int, ...],
              down_tail: tuple[int, ...], energy: float | None = None) -> Truncation:
    """Truncate the SVD u · diag(s) · vh of an explicit matrix by the rule."""
    if not bool(s[0] > 0):
        return _zero(u.shape[0], vh.shape[1], u.device, up_tail, down_tail, s)
    kept, retained = _keep(rule, s, energy)
    up_k, down_k = _balanced(u[:, :kept], s[:kept], vh[:kept])
    return Truncation(*_shaped(up_k, down_k, up_tail, down_tail), kept, retained, s)


def _truncate_matrix(matrix: torch.Tensor, rule: Rule, up_tail: tuple[int, ...], down_tail: tuple[int, ...]
                     ) -> Truncation:
    """Exact truncated SVD of an explicit 2-D fp32 matrix."""
    _check_finite(matrix)
    return _from_svd(*torch.linalg.svd(matrix, full_matrices=False), rule, up_tail, down_tail)


def _leading_svd(matrix: torch.Tensor, sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko et al.) with power iterations; the probe is drawn on the CPU from a fixed
    seed, so extract gives the same file on every run and every device.
    """
    probe = torch.randn(matrix.shape[1], sample, generator=torch.Generator().manual_seed(0)).to(matrix.device)
    basis = torch.linalg.qr(matrix @ probe).Q
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ u, s, vh


def _flat(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 up [out, r] and down [r, in·k·k], checked to share the rank."""
    up2, down2 = up.float().reshape(up.shape[0], -1), down.float().reshape(down.shape[0], -1)
    if up2.shape[1] != down2.shape[0]:
        raise AdapterzooError(f"up {tuple(up.shape)} and down {tuple(down.shape)} disagree on the rank")
    return up2, down2


def truncate(up: torch.Tensor, down: torch.Tensor, scale: float, rule: Rule,
             mid: torch.Tensor | None = None) -> Truncation:
    """Optimal truncation of ΔW = scale · up @ down (· mid) to the rule's rank, from the factors alone.

    A Tucker mid is folded into down first, so the result is a plain k x k conv LoRA.
    """
    if mid is not None:
        down = fold_tucker(down, mid)
    up2, down2 = _flat(up, down)
    return _truncate_flat(up2 * scale, down2, rule, tuple(up.shape[2:]), tuple(down.shape[1:]))


def concat(pairs: list[tuple[torch.Tensor, torch.Tensor, float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of (up, down, scale, weight) LoRAs: ranks stacked, weight·scale folded in.

    up @ down of the result equals Σ weight · scale · up @ down, so store it with alpha = its rank.
    Each factor gets √|weight·scale|; the sign goes on down. The layout follows the first pair.
    """
    if not pairs:
        raise AdapterzooError("nothing to merge: no LoRA given")
    first_up, first_down = pairs[0][0], pairs[0][1]
    target = (first_up.shape[0], math.prod(first_down.shape[1:]))
    ups, downs = [], []
    for up, down, scale, weight in pairs:
        up2, down2 = _flat(up, down)
        if (up2.shape[0], down2.shape[1]) != target:
            raise AdapterzooError(
                f"cannot merge a LoRA of shape {tuple(up.shape)} x {tuple(down.shape)} with one of "
                f"{tuple(first_up.shape)} x {tuple(first_down.shape)}: they target different weights")
        factor = weight * scale
        root = math.sqrt(abs(factor))
        ups.append(up2 * root)
        downs.append(down2 * math.copysign(root, factor))
    return _shaped(torch.cat(ups, dim=1), torch.cat(downs, dim=0), tuple(first_up.shape[2:]),
                   tuple(first_down.shape[1:]))


def svd_merge(pairs: list[tuple[torch.Tensor, torch.Tensor, float, float]], rule: Rule) -> Truncation:
    """Σ weight · scale · up @ down re-factorised to the rule's rank (lossy, kohya svd_merge_lora).

    From the stacked factors while their summed rank is below min(out, in), else from the explicit sum.
    """
    up, down = concat(pairs)
    up2, down2 = _flat(up, down)
    up_tail, down_tail = tuple(up.shape[2:]), tuple(down.shape[1:])
    if up2.shape[1] < min(up2.shape[0], down2.shape[1]):
        return _truncate_flat(up2, down2, rule, up_tail, down_tail)
    return _truncate_matrix(up2 @ down2, rule, up_tail, down_tail)


def extract(delta_w: torch.Tensor, rule: Rule) -> Truncation | None:
    """Low-rank LoRA approximating a weight difference [out, in] or [out, in, k, k]; None if it is zero.

    Conv differences give down [k, in, kh, kw] and up [out, k, 1, 1]. A small fixed Rank on a large
    matrix uses a seeded randomized SVD (near-optimal, much faster); everything else the exact thin SVD.
    """
    matrix = delta_w.float().reshape(delta_w.shape[0], -1)
    if not bool(matrix.any()):
        return None
    up_tail, down_tail = (1,) * (delta_w.dim() - 2), tuple(delta_w.shape[1:])
    if isinstance(rule, Rank) and rule.n + _OVERSAMPLE <= _RANDOMIZED_MAX_FRACTION * min(matrix.shape):
        _check_finite(matrix)
        energy = float(torch.linalg.vector_norm(matrix)) ** 2
        return _from_svd(*_leading_svd(matrix, rule.n + _OVERSAMPLE), rule, up_tail, down_tail, energy)
    return _truncate_matrix(matrix, rule, up_tail, down_tail)
