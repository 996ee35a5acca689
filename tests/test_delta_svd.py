"""LoKr, LoHa, LoRA and full modules truncated from their structure give exactly what a dense SVD of the ΔW the
reader forms gives: the same best rank-k matrix, the same retained fraction.

The reference is plain torch: `scaled_delta()` (the reader's ΔW, as merge and verify apply it) in float64 and
torch.linalg.svd of it. Every LoKr layout the reader takes is here, the early conv one with the kernel split
between both factors included, and LoHa with and without Tucker cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from adapterzoo.formats.lora.delta_svd import module_svd
from adapterzoo.formats.lora.lora_approx import approximate
from adapterzoo.formats.lora.lora_model import FullModule, LohaModule, LokrModule, LoraModule
from adapterzoo.ops.lowrank import Rank, SvFro, svd_merge, truncate_module

CPU = torch.device("cpu")


def r(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


MODULES: dict[str, Callable[[], LoraModule | LohaModule | LokrModule | FullModule]] = {
    "lokr w1, w2 full": lambda: LokrModule(1.0, (24, 30), w1=r(1, 4, 5), w2=r(2, 6, 6)),
    "lokr w1 full, w2 a@b": lambda: LokrModule(2.0, (24, 30), w1=r(3, 4, 5), w2_a=r(4, 6, 3), w2_b=r(5, 3, 6)),
    "lokr w1 a@b, w2 full": lambda: LokrModule(2.0, (24, 30), w1_a=r(6, 4, 2), w1_b=r(7, 2, 5), w2=r(8, 6, 6)),
    "lokr both a@b": lambda: LokrModule(3.0, (24, 30), w1_a=r(9, 4, 2), w1_b=r(10, 2, 5), w2_a=r(11, 6, 2),
                                        w2_b=r(12, 2, 6)),
    # The real files' layout: a 3x3 conv with the kernel split between both 2-D factors (8 = 2·4, 4·3·3 = 6·6).
    "lokr early conv, kernel in both": lambda: LokrModule(4.0, (8, 4, 3, 3), w1_a=r(13, 2, 4), w1_b=r(14, 4, 6),
                                                          w2_a=r(15, 4, 4), w2_b=r(16, 4, 6)),
    "lokr conv, w2 2-D with the kernel": lambda: LokrModule(1.0, (8, 6, 3, 3), w1=r(17, 2, 2), w2_a=r(18, 4, 3),
                                                            w2_b=r(19, 3, 27)),
    "lokr conv, w2 4-D": lambda: LokrModule(1.0, (8, 6, 3, 3), w1=r(20, 2, 2), w2=r(21, 4, 3, 3, 3)),
    "lokr conv, w2 Tucker": lambda: LokrModule(2.0, (8, 6, 3, 3), w1=r(22, 2, 3), w2_a=r(23, 2, 4), w2_b=r(24, 2, 2),
                                               t2=r(25, 2, 2, 3, 3)),
    "loha": lambda: LohaModule(r(26, 20, 3), r(27, 3, 16), r(28, 20, 2), r(29, 2, 16), 1.5, (20, 16)),
    "loha conv": lambda: LohaModule(r(30, 20, 3), r(31, 3, 36), r(32, 20, 3), r(33, 3, 36), 6.0, (20, 4, 3, 3)),
    "loha conv Tucker": lambda: LohaModule(r(34, 3, 20), r(35, 3, 4), r(36, 2, 20), r(37, 2, 4), 3.0, (20, 4, 3, 3),
                                           t1=r(38, 3, 3, 3, 3), t2=r(39, 2, 2, 3, 3)),
    "locon Tucker": lambda: LoraModule(r(40, 3, 4, 1, 1), r(41, 20, 3, 1, 1), 1.0, (20, 4, 3, 3), mid=r(42, 3, 3, 3, 3)),
    "full": lambda: FullModule(r(43, 20, 4, 3, 3), (20, 4, 3, 3)),
}


def dense(module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reader's ΔW as [out, in·k·k] in float64, and its thin SVD."""
    matrix = module.scaled_delta().double().reshape(module.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


def best(module, k: int) -> torch.Tensor:
    u, s, vh = dense(module)
    return (u[:, :k] * s[:k]) @ vh[:k]


def retained(module, k: int) -> float:
    s = dense(module)[1]
    return float(s[:k].norm() / s.norm())


def flat_product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)


def assert_close_to_best(got: torch.Tensor, module, k: int) -> None:
    expected = best(module, k)
    assert float(torch.linalg.norm(got - expected)) <= 1e-5 * float(torch.linalg.norm(expected))


@pytest.mark.parametrize("name", MODULES)
def test_every_singular_value_is_the_dense_svds(name):
    module = MODULES[name]()
    s = dense(module)[1]
    svd = module_svd(module)
    n = len(svd.s)
    torch.testing.assert_close(svd.s.double(), s[:n], rtol=1e-5, atol=1e-6 * float(s[0]))
    assert float(s[n:].sum()) <= 1e-6 * float(s[0])  # what the structure leaves out is zero
    assert svd.energy == pytest.approx(float(s.square().sum()), rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("name", MODULES)
def test_convert_rank_is_the_dense_svds_truncation(name, k):
    module = MODULES[name]()
    result = approximate(module, k)
    assert result.module.shape == module.shape and result.module.alpha == result.module.rank
    assert tuple(result.module.down.shape[1:]) == module.shape[1:]
    assert_close_to_best(flat_product(result.module.up, result.module.down), module, k)
    assert result.retained == pytest.approx(retained(module, k), rel=1e-6)


@pytest.mark.parametrize("name", MODULES)
def test_resize_and_merge_truncate_to_the_rule_like_the_dense_svd(name):
    module = MODULES[name]()
    t = truncate_module(module, Rank(3), CPU, weight=-0.5)
    expected = -0.5 * best(module, 3)
    assert float(torch.linalg.norm(flat_product(t.up, t.down) - expected)) <= 1e-5 * float(expected.norm())
    s = dense(module)[1]
    k = next(k for k in range(1, len(s) + 1) if float(s[:k].norm() / s.norm()) >= 0.9)
    t = svd_merge([(module, 1.0)], SvFro(0.9), CPU)
    assert t.kept_rank == k and t.retained_fro == pytest.approx(retained(module, k), rel=1e-6)
    assert_close_to_best(flat_product(t.up, t.down), module, k)


def test_a_sum_of_lokr_loha_full_and_lora_is_truncated_like_its_dense_svd():
    members = [(MODULES["lokr early conv, kernel in both"](), 0.7),
               (LohaModule(r(50, 8, 2), r(51, 2, 36), r(52, 8, 2), r(53, 2, 36), 2.0, (8, 4, 3, 3)), -0.4),
               (FullModule(r(54, 8, 4, 3, 3) * 0.1, (8, 4, 3, 3)), 1.0),
               (LoraModule(r(55, 2, 4, 3, 3), r(56, 8, 2, 1, 1), 1.0, (8, 4, 3, 3)), 0.3)]
    total = sum(w * m.scaled_delta().double().reshape(8, -1) for m, w in members)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    t = svd_merge(members, Rank(3), CPU)
    expected = (u[:, :3] * s[:3]) @ vh[:3]
    assert float(torch.linalg.norm(flat_product(t.up, t.down) - expected)) <= 1e-5 * float(expected.norm())
    assert t.retained_fro == pytest.approx(float(s[:3].norm() / s.norm()), rel=1e-6)


def test_a_small_rank_of_a_large_full_module_is_near_optimal_and_its_fraction_exact():
    # Rank 4 of 200 x 360 takes the randomized SVD; a slowly decaying spectrum is its hard case.
    q_left = torch.linalg.qr(r(60, 200, 200)).Q
    q_right = torch.linalg.qr(r(61, 360, 200)).Q
    diff = (q_left * torch.arange(1, 201, dtype=torch.float32) ** -0.5) @ q_right.T
    module = FullModule(diff, (200, 360))
    result = approximate(module, 4)
    s = dense(module)[1]
    error = float(torch.linalg.norm(diff.double() - flat_product(result.module.up, result.module.down)))
    assert error <= 1.01 * float(s[4:].norm())
    kept = flat_product(result.module.up, result.module.down).square().sum()
    # ‖ΔW‖_F² comes from the module: the fraction is exact for what was kept, not relative to the leading σ.
    assert result.total == pytest.approx(float(s.square().sum()), rel=1e-5)
    assert result.retained == pytest.approx(math.sqrt(float(kept) / float(s.square().sum())), rel=1e-4)
