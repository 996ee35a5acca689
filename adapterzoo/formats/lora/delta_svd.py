"""The SVD of a LoRA-family module's ΔW taken from its structure, never forming ΔW where it has one.

A product of thin factors: QR of both and the SVD of the small core. LoKr, ΔW = A ⊗ B: the singular
values are the products σᵢ(A)·σⱼ(B) and the vectors the Kronecker products of the factors' vectors.
LoHa, (A₁B₁) ⊙ (A₂B₂) = (A₁ ∗ A₂)(B₁ ∗ B₂)ᵀ with row-wise Khatri–Rao products: a product of rank
≤ r₁r₂. A full (diff) module: a dense SVD, randomized when a few leading directions of a large matrix
are all that is wanted. ‖ΔW‖_F² always comes from the module itself, so a retained fraction is exact.
Structured work is small and runs in float64; the directions come out in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.lora_model import FullModule, LohaModule, LokrModule, LoraModule

# Extra directions sampled beyond the wanted rank, and power iterations, of the randomized SVD.
OVERSAMPLE = 10
POWER_ITERATIONS = 4
# A randomized SVD pays off only when it samples a small fraction of the matrix's smaller side.
RANDOMIZED_MAX_FRACTION = 0.125
CPU = torch.device("cpu")

Structured = LoraModule | LohaModule | LokrModule | FullModule


@dataclass(frozen=True)
class DeltaSvd:
    """ΔW [out, in·k·k] = u · diag(s) · vh. `s` is descending: every singular value, or after a randomized
    SVD the leading ones only; `energy` is ‖ΔW‖_F² exactly; `directions(k)` forms u[:, :k] and vh[:k] alone."""

    s: torch.Tensor
    energy: float
    directions: Callable[[int], tuple[torch.Tensor, torch.Tensor]]

    def factors(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, k], down [k, in·k·k]) in float32 with up @ down the best rank-k ΔW; √σ on each side
        keeps fp16 storage well inside its range."""
        u, vh = self.directions(k)
        root = self.s[:k].to(u.dtype).sqrt()
        return (u * root).float(), (root[:, None] * vh).float()

    def kept_energy(self, k: int) -> float:
        """Σ of the k largest σ²: ‖ΔW_k‖_F²."""
        return _square_sum(self.s[:k])


def _square_sum(s: torch.Tensor) -> float:
    """Σ s² in float64, on the CPU (MPS has no float64): ‖ΔW‖_F² from its singular values."""
    return float(s.cpu().double().square().sum())


def check_finite(t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise AdapterzooError("the weights contain NaN or infinite values; nothing sensible can be computed")


def _randomized_pays(wanted: int | None, size: int) -> bool:
    """Whether `wanted` leading directions of something of rank up to `size` are cheaper by a randomized SVD."""
    return wanted is not None and wanted + OVERSAMPLE <= RANDOMIZED_MAX_FRACTION * size


def product_svd(left: torch.Tensor, right: torch.Tensor, wanted: int | None = None) -> DeltaSvd:
    """SVD of left [out, r] @ right [r, in], never formed: exact from QR of both factors and the SVD of the small
    core; randomized through the factors when only `wanted` leading directions of a large r are asked for."""
    if _randomized_pays(wanted, min(left.shape[1], left.shape[0], right.shape[1])):
        check_finite(left)
        check_finite(right)
        u, s, vh = _leading_svd(lambda x: left @ (right @ x), lambda x: right.T @ (left.T @ x), right.shape[1],
                                wanted + OVERSAMPLE, left)
        energy = float(((left.T @ left).cpu().double() * (right @ right.T).cpu().double()).sum())  # tr(LᵀL RRᵀ)
        return DeltaSvd(s, energy, lambda k: (u[:, :k], vh[:k]))
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    core = r_left @ r_right.T
    check_finite(core)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return DeltaSvd(s, _square_sum(s), lambda k: (q_left @ u[:, :k], vh[:k] @ q_right.T))


def matrix_svd(matrix: torch.Tensor, wanted: int | None = None) -> DeltaSvd:
    """SVD of an explicit 2-D matrix: randomized (seeded, near-optimal) when only `wanted` leading directions
    are asked of a matrix whose smaller side is large against them, else the exact thin SVD."""
    check_finite(matrix)
    if _randomized_pays(wanted, min(matrix.shape)):
        u, s, vh = _leading_svd(lambda x: matrix @ x, lambda x: matrix.T @ x, matrix.shape[1], wanted + OVERSAMPLE,
                                matrix)
        energy = float(torch.linalg.vector_norm(matrix)) ** 2
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        energy = _square_sum(s)
    return DeltaSvd(s, energy, lambda k: (u[:, :k], vh[:k]))


Apply = Callable[[torch.Tensor], torch.Tensor]


def _leading_svd(apply: Apply, apply_t: Apply, columns: int, sample: int, like: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko et al.) of a matrix A known by x -> A x and x -> Aᵀ x, with power iterations
    re-orthonormalised at each step. The probe is drawn on the CPU from a fixed seed, so the same input gives
    the same file on every run and device; `like` gives the device and dtype to work in."""
    probe = torch.randn(columns, sample, generator=torch.Generator().manual_seed(0)).to(like.device, like.dtype)
    basis = torch.linalg.qr(apply(probe)).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(apply(torch.linalg.qr(apply_t(basis)).Q)).Q
    u, s, vh = torch.linalg.svd(apply_t(basis).T, full_matrices=False)
    return basis @ u, s, vh


def kron_svd(a: DeltaSvd, b: DeltaSvd) -> DeltaSvd:
    """SVD of A ⊗ B from complete SVDs of A and B: σ are the products, vectors the Kronecker products."""
    (u_a, vh_a), (u_b, vh_b) = a.directions(len(a.s)), b.directions(len(b.s))
    s, order = torch.sort(torch.outer(a.s, b.s).flatten(), descending=True)

    def directions(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, j = order[:k] // len(b.s), order[:k] % len(b.s)
        u = (u_a[:, None, i] * u_b[None, :, j]).reshape(-1, len(i))  # row p·rows(B) + q: u_a[p] u_b[q]
        vh = (vh_a[i, :, None] * vh_b[j, None, :]).reshape(len(i), -1)
        return u, vh

    return DeltaSvd(s, a.energy * b.energy, directions)


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _tucker_factors(core: torch.Tensor, outer: torch.Tensor, inner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LyCORIS rebuild_tucker(core [r, r, k, k], outer [r, out], inner [r, in]) as left [out, r] @ right [r, in·k·k]."""
    right = torch.einsum("ijhw,jq->iqhw", core, inner).flatten(1)
    return outer.T, right


def _loha_half(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _tucker_factors(t, a, b) if t is not None else (a, b.flatten(1))


def loha_factors(module: LohaModule, weight: float = 1.0, device: torch.device = CPU
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of weight · scale · ΔW of a LoHa, rank r₁·r₂: row-wise Khatri–Rao products of its halves."""
    on = {"device": device, "dtype": _work_dtype(device)}
    t1, t2 = (None if t is None else t.to(**on) for t in (module.t1, module.t2))
    left1, right1 = _loha_half(module.w1_a.to(**on), module.w1_b.to(**on), t1)
    left2, right2 = _loha_half(module.w2_a.to(**on), module.w2_b.to(**on), t2)
    left = (left1[:, :, None] * left2[:, None, :]).flatten(1) * (weight * module.alpha / module.rank)
    right = (right1[:, None, :] * right2[None, :, :]).flatten(0, 1)
    return left, right


def lora_factors(module: LoraModule, weight: float = 1.0, device: torch.device = CPU
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in·k·k]) with weight · scale folded into up and any Tucker mid into down."""
    on = {"device": device, "dtype": _work_dtype(device)}
    down = module.down.to(**on).flatten(1)
    if module.mid is not None:
        down = torch.einsum("abhw,bi->aihw", module.mid.to(**on), down).flatten(1)
    return module.up.to(**on).flatten(1) * (weight * module.scale), down


def _lokr_halves(module: LokrModule, weight: float, device: torch.device) -> tuple[DeltaSvd, DeltaSvd]:
    """Complete SVDs of the 2-D factors A, B with ΔW [out, in·k·k] = weight · scale · A ⊗ B, as the reader forms it:
    w1 flattened to 2-D; w2 (full, product or Tucker) with its kernel flattened into the columns. That is
    also the early LyCORIS conv layout with the kernel split between both factors."""
    on = {"device": device, "dtype": _work_dtype(device)}
    scale = weight * module.scale
    if module.w1 is not None:
        first = matrix_svd(module.w1.to(**on).flatten(1) * scale)
    else:
        first = product_svd(module.w1_a.to(**on) * scale, module.w1_b.to(**on).flatten(1))
    if module.w2 is not None:
        second = matrix_svd(module.w2.to(**on).flatten(1))
    elif module.t2 is not None:
        second = product_svd(*_tucker_factors(module.t2.to(**on), module.w2_a.to(**on), module.w2_b.to(**on)))
    else:
        second = product_svd(module.w2_a.to(**on), module.w2_b.to(**on).flatten(1))
    return first, second


def module_svd(module: Structured, wanted: int | None = None, weight: float = 1.0,
               device: torch.device = CPU) -> DeltaSvd:
    """SVD of weight · scale · ΔW (before any DoRA normalisation) of a module, as a 2-D [out, in·k·k] matrix.

    `wanted` is the rank the caller will keep if it knows it already: a full module may then use a
    randomized SVD. Every other kind is exact from its factors.
    """
    if isinstance(module, LokrModule):
        return kron_svd(*_lokr_halves(module, weight, device))
    if isinstance(module, LohaModule):
        return product_svd(*loha_factors(module, weight, device))
    if isinstance(module, LoraModule):
        return product_svd(*lora_factors(module, weight, device))
    diff = module.diff.to(device, torch.float32).reshape(module.shape[0], -1)
    return matrix_svd(diff * weight if weight != 1 else diff, wanted)


def exact_factors(module: LoraModule | LohaModule | LokrModule, weight: float = 1.0,
                  device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin factors (up [out, n], down [n, in·k·k]) whose product is exactly weight · scale · ΔW: a LoRA's own,
    a LoHa's Khatri–Rao products (n = r₁r₂), a LoKr's Kronecker SVD (n = rank A · rank B)."""
    if isinstance(module, LoraModule):
        return lora_factors(module, weight, device)
    if isinstance(module, LohaModule):
        return loha_factors(module, weight, device)
    svd = module_svd(module, None, weight, device)
    u, vh = svd.directions(len(svd.s))
    return u * svd.s, vh


def module_dtype(module: Structured) -> torch.dtype:
    """The dtype the file stores the module's factors in, which an approximation of it keeps."""
    if isinstance(module, FullModule):
        return module.diff.dtype
    if isinstance(module, LoraModule):
        return module.up.dtype
    if isinstance(module, LohaModule):
        return module.w1_a.dtype
    return next(t for t in (module.w1, module.w1_a, module.w2, module.w2_a) if t is not None).dtype
