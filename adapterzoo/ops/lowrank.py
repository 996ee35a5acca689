"""Low-rank algebra on LoRA factors: resize, exact and SVD merges, extraction (FORMATS.md §1.1, §1.5).

Factors follow the canonical form: `up` [out, r] or [out, r, 1, 1], `down` [r, in] or [r, in, k, k],
optional Tucker `mid` [r, r, k, k]; ΔW = scale · up @ down. Truncations never form the out x in matrix
when the factors are thin: QR of both factors leaves an r x r core whose SVD is the SVD of ΔW. LoHa and
LoKr modules are truncated from their own structure (`formats.lora.delta_svd`), exactly and without ΔW.
Everything is computed on the device the inputs live on; results stay there, in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.delta_svd import (
    DeltaSvd,
    Structured,
    exact_factors,
    matrix_svd,
    module_svd,
    product_svd,
)
from adapterzoo.formats.lora.lora_model import FullModule


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
    them, except after a randomized SVD, which computes only the leading ones); `energy` = ‖ΔW‖_F².
    """

    up: torch.Tensor
    down: torch.Tensor
    kept_rank: int
    retained_fro: float
    sv: torch.Tensor
    energy: float

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


def _keep(rule: Rule, s: torch.Tensor, energy: float) -> tuple[int, float]:
    """(kept rank, retained Frobenius fraction) for singular values `s`, which must not be all zero, of a ΔW
    with ‖ΔW‖_F² = `energy` (more than Σ s² when `s` holds only the leading singular values)."""
    values = s.tolist()
    kept = _select_rank(rule, values)
    return kept, min(1.0, math.sqrt(sum(v * v for v in values[:kept]) / energy))


def _shaped(up2: torch.Tensor, down2: torch.Tensor, up_tail: tuple[int, ...], down_tail: tuple[int, ...]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Give 2-D factors the layout of the originals: [out, r(, 1, 1)] and [r, in(, k, k)]."""
    return (up2.reshape(up2.shape[0], up2.shape[1], *up_tail),
            down2.reshape(down2.shape[0], *down_tail))


def _truncation(svd: DeltaSvd, rule: Rule, out: int, up_tail: tuple[int, ...], down_tail: tuple[int, ...]
                ) -> Truncation:
    """The rule's truncation of ΔW [out, ...] from its SVD. An all-zero ΔW stays a rank-1 zero module, so a
    resized file keeps the same module set."""
    if not bool(svd.s[0] > 0):
        device = svd.s.device
        up, down = _shaped(torch.zeros(out, 1, device=device), torch.zeros(1, math.prod(down_tail), device=device),
                           up_tail, down_tail)
        return Truncation(up, down, 1, 1.0, svd.s.float(), svd.energy)
    kept, retained = _keep(rule, svd.s, svd.energy)
    return Truncation(*_shaped(*svd.factors(kept), up_tail, down_tail), kept, retained, svd.s.float(), svd.energy)


def _flat(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 up [out, r] and down [r, in·k·k], checked to share the rank."""
    up2, down2 = up.float().reshape(up.shape[0], -1), down.float().reshape(down.shape[0], -1)
    if up2.shape[1] != down2.shape[0]:
        raise AdapterzooError(f"up {tuple(up.shape)} and down {tuple(down.shape)} disagree on the rank")
    return up2, down2


def _wanted(rule: Rule) -> int | None:
    """The rank a rule keeps if known before the spectrum is: only then may a randomized SVD serve."""
    return rule.n if isinstance(rule, Rank) else None


def _tails(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The trailing dims of up and down for a target weight of `shape`: a conv's up is [out, r, 1, 1]."""
    return (1,) * (len(shape) - 2), tuple(shape[1:])


def truncate(up: torch.Tensor, down: torch.Tensor, scale: float, rule: Rule,
             mid: torch.Tensor | None = None) -> Truncation:
    """Optimal truncation of ΔW = scale · up @ down (· mid) to the rule's rank, from the factors alone.

    A Tucker mid is folded into down first, so the result is a plain k x k conv LoRA.
    """
    if mid is not None:
        down = fold_tucker(down, mid)
    up2, down2 = _flat(up, down)
    return _truncation(product_svd(up2 * scale, down2), rule, up2.shape[0], tuple(up.shape[2:]),
                       tuple(down.shape[1:]))


def truncate_module(module: Structured, rule: Rule, device: torch.device, weight: float = 1.0) -> Truncation:
    """Optimal truncation of weight · ΔW of a LoRA, LoHa, LoKr or full module, from its structure: exact
    for all but a full module asked for a small fixed rank, whose randomized SVD is near-optimal."""
    return _truncation(module_svd(module, _wanted(rule), weight, device), rule, module.shape[0],
                       *_tails(module.shape))


def _sum_svd(ups: list[torch.Tensor], downs: list[torch.Tensor], dense: torch.Tensor | None,
             wanted: int | None) -> DeltaSvd:
    """SVD of dense + Σ up @ down (2-D, in fp32): from the stacked factors while there is no dense part and their
    ranks sum below min(out, in), else from the explicit sum. A small `wanted` rank of either may be randomized."""
    up2, down2 = torch.cat(ups, dim=1).float(), torch.cat(downs, dim=0).float()
    if dense is None and up2.shape[1] < min(up2.shape[0], down2.shape[1]):
        return product_svd(up2, down2, wanted)
    matrix = up2 @ down2
    return matrix_svd(matrix if dense is None else matrix + dense, wanted)


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


def svd_merge(members: list[tuple[Structured, float]], rule: Rule, device: torch.device) -> Truncation:
    """Σ weight · ΔW of (module, weight) members re-factorised to the rule's rank (lossy, kohya svd_merge_lora).

    One member is truncated from its own structure. Several: each one's exact thin factors (LoRA; LoHa by
    Khatri–Rao; LoKr from its Kronecker SVD) are stacked while their ranks sum below min(out, in), full
    modules and larger sums are added up explicitly.
    """
    if not members:
        raise AdapterzooError("nothing to merge: no LoRA given")
    shape = members[0][0].shape
    if any(module.shape != shape for module, _ in members):
        shapes = " and ".join(sorted({str(list(module.shape)) for module, _ in members}))
        raise AdapterzooError(f"cannot merge changes of different weights: {shapes}")
    if len(members) == 1:
        return truncate_module(members[0][0], rule, device, members[0][1])
    ups, downs, dense = [], [], None
    for module, weight in members:
        if isinstance(module, FullModule):
            diff = module.diff.to(device, torch.float32).reshape(shape[0], -1) * weight
            dense = diff if dense is None else dense + diff
        else:
            up, down = exact_factors(module, weight, device)
            ups.append(up)
            downs.append(down)
    if not ups:
        ups, downs = [torch.zeros(shape[0], 0, device=device)], [torch.zeros(0, dense.shape[1], device=device)]
    return _truncation(_sum_svd(ups, downs, dense, _wanted(rule)), rule, shape[0], *_tails(shape))


def extract(delta_w: torch.Tensor, rule: Rule) -> Truncation | None:
    """Low-rank LoRA approximating a weight difference [out, in] or [out, in, k, k]; None if it is zero.

    Conv differences give down [k, in, kh, kw] and up [out, k, 1, 1]. A small fixed Rank on a large
    matrix uses a seeded randomized SVD (near-optimal, much faster); everything else the exact thin SVD.
    """
    matrix = delta_w.float().reshape(delta_w.shape[0], -1)
    if not bool(matrix.any()):
        return None
    return _truncation(matrix_svd(matrix, _wanted(rule)), rule, matrix.shape[0], *_tails(tuple(delta_w.shape)))
