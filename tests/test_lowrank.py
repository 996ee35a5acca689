"""Resize, merge and extract must give the optimal low-rank ΔW that plain torch computes from the full matrix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapterzoo import devices as ops_device
from adapterzoo.devices import pick_device
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.lora_model import LoraModule
from adapterzoo.ops.lowrank import (
    Rank,
    SvCumulative,
    SvFro,
    SvRatio,
    Truncation,
    concat,
    delta,
    extract,
    svd_merge,
    truncate,
)

KNOWN_SPECTRUM = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25)
CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


def reference_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the explicit matrix in float64: the independent answer every test compares with."""
    return torch.linalg.svd(matrix.double().reshape(matrix.shape[0], -1), full_matrices=False)


def product(t: Truncation) -> torch.Tensor:
    """ΔW_k of a truncation, as a 2-D float64 matrix."""
    return t.up.double().reshape(t.up.shape[0], -1) @ t.down.double().reshape(t.down.shape[0], -1)


def assert_optimal(t: Truncation, full: torch.Tensor, k: int) -> None:
    """ΔW_k is the Eckart–Young truncation of `full`: same error, same matrix, same singular values."""
    u, s, vh = reference_svd(full)
    matrix = full.double().reshape(full.shape[0], -1)
    assert t.kept_rank == k
    optimal_error = float(s[k:].square().sum().sqrt())
    error = float(torch.linalg.norm(matrix - product(t)))
    assert error == pytest.approx(optimal_error, rel=1e-4, abs=1e-5 * float(s[0]))
    best = (u[:, :k] * s[:k]) @ vh[:k]
    assert float(torch.linalg.norm(product(t) - best)) <= 1e-4 * float(torch.linalg.norm(best))
    n = min(len(t.sv), int((s > 1e-5 * s[0]).sum()))
    torch.testing.assert_close(t.sv[:n].double(), s[:n], rtol=1e-4, atol=1e-5 * float(s[0]))
    assert t.retained_fro == pytest.approx(float(s[:k].norm() / s.norm()), rel=1e-5)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(randn(rows, cols, seed=seed)).Q


def slowly_decaying(rows: int, cols: int) -> torch.Tensor:
    """A full-rank matrix with σ_i = i^-1/2, like the difference of a fine-tune and its base."""
    spectrum = torch.arange(1, rows + 1, dtype=torch.float32) ** -0.5
    return orthonormal(rows, rows, seed=75) * spectrum @ orthonormal(cols, rows, seed=76).T


def lora_with_spectrum(spectrum: tuple[float, ...], out: int = 40, inner: int = 30
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors whose product has exactly these singular values, hidden behind a random mixing of the rank."""
    r = len(spectrum)
    mix = torch.linalg.qr(randn(r, r, seed=3)).Q * 1.7
    up = orthonormal(out, r, seed=1) * torch.tensor(spectrum) @ mix
    down = torch.linalg.inv(mix) @ orthonormal(inner, r, seed=2).T
    return up, down


# --- truncate: resize a LoRA from its factors ------------------------------------------------------------


def test_truncate_is_the_optimal_truncation_of_the_scaled_delta():
    up, down = randn(96, 24, seed=10), randn(24, 80, seed=11)
    t = truncate(up, down, 0.25, Rank(8))
    assert t.up.shape == (96, 8) and t.down.shape == (8, 80)
    assert_optimal(t, 0.25 * up.double() @ down.double(), 8)


def test_truncate_keeps_every_direction_when_asked_for_more_than_the_rank():
    up, down = randn(50, 6, seed=12), randn(6, 70, seed=13)
    t = truncate(up, down, 2.0, Rank(32))
    assert t.kept_rank == 6
    torch.testing.assert_close(product(t), 2.0 * up.double() @ down.double(), rtol=1e-4, atol=1e-4)
    assert t.retained_fro == pytest.approx(1.0)


def test_truncate_accepts_half_precision_factors_and_answers_in_fp32():
    up, down = randn(64, 16, seed=14).half(), randn(16, 48, seed=15).half()
    t = truncate(up, down, 0.5, Rank(4))
    assert t.up.dtype == t.down.dtype == torch.float32
    assert_optimal(t, 0.5 * up.double() @ down.double(), 4)


@pytest.mark.parametrize(
    ("rule", "kept"),
    [
        (Rank(3), 3),
        (Rank(100), 6),
        (SvRatio(5.0), 3),  # keep σ >= 8/5 = 1.6
        (SvRatio(10.0), 4),  # keep σ >= 0.8
        (SvRatio(1.0), 1),
        (SvFro(0.8), 1),  # √(64/85.3125) = 0.866
        (SvFro(0.9), 2),  # √(80/85.3125) = 0.968
        (SvFro(0.99), 3),  # √(84/85.3125) = 0.992
        (SvFro(1.0), 6),
        (SvCumulative(0.5), 1),  # 8/15.75 = 0.508
        (SvCumulative(0.75), 2),  # 12/15.75 = 0.762
        (SvCumulative(0.9), 4),  # 14/15.75 = 0.889, 15/15.75 = 0.952
    ],
)
def test_each_rule_picks_the_rank_its_definition_gives(rule, kept):
    up, down = lora_with_spectrum(KNOWN_SPECTRUM)
    t = truncate(up, down, 1.0, rule)
    assert t.kept_rank == kept
    squares = [s * s for s in KNOWN_SPECTRUM]
    assert t.retained_fro == pytest.approx(math.sqrt(sum(squares[:kept]) / sum(squares)), rel=1e-5)
    torch.testing.assert_close(t.sv, torch.tensor(KNOWN_SPECTRUM), rtol=1e-5, atol=1e-5)


def test_truncate_of_a_3x3_conv_lora_keeps_the_conv_layout():
    up, down = randn(32, 12, 1, 1, seed=20), randn(12, 16, 3, 3, seed=21)
    t = truncate(up, down, 0.75, Rank(5))
    assert t.up.shape == (32, 5, 1, 1) and t.down.shape == (5, 16, 3, 3)
    full = 0.75 * delta(up, down)
    assert full.shape == (32, 16, 3, 3)
    assert_optimal(t, full, 5)


def test_conv_delta_is_what_the_two_convolutions_do():
    up, down = randn(8, 4, 1, 1, seed=22), randn(4, 6, 3, 3, seed=23)
    x = randn(2, 6, 9, 9, seed=24)
    chained = F.conv2d(F.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(F.conv2d(x, delta(up, down), padding=1), chained, rtol=1e-4, atol=1e-4)


def test_tucker_delta_is_what_the_three_convolutions_do_and_truncate_folds_it():
    up, mid, down = randn(24, 6, 1, 1, seed=25), randn(6, 6, 3, 3, seed=26), randn(6, 10, 1, 1, seed=27)
    x = randn(2, 10, 9, 9, seed=28)
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    full = delta(up, down, mid)
    torch.testing.assert_close(F.conv2d(x, full, padding=1), chained, rtol=1e-4, atol=1e-4)
    t = truncate(up, down, 0.5, Rank(4), mid=mid)
    assert t.up.shape == (24, 4, 1, 1) and t.down.shape == (4, 10, 3, 3)
    assert_optimal(t, 0.5 * full, 4)


def test_factors_for_alpha_keep_the_delta_under_another_alpha():
    up, down = randn(40, 10, seed=30), randn(10, 30, seed=31)
    t = truncate(up, down, 0.1, Rank(4))
    new_up, new_down = t.factors_for_alpha(1.0)
    torch.testing.assert_close((1.0 / 4) * (new_up @ new_down), t.up @ t.down, rtol=1e-5, atol=1e-6)


def test_factors_are_balanced_so_fp16_storage_loses_little():
    up, down = randn(320, 32, seed=32) * 0.02, randn(32, 768, seed=33) * 0.02
    t = truncate(up, down, 1.0 / 32, Rank(8))
    assert float(t.up.norm()) == pytest.approx(float(t.down.norm()), rel=1e-4)
    stored = t.up.half().float() @ t.down.half().float()
    assert float((stored - t.up @ t.down).norm() / (t.up @ t.down).norm()) < 1e-3


def test_a_zero_module_stays_a_rank_one_zero_module():
    t = truncate(torch.zeros(30, 4), randn(4, 20, seed=34), 1.0, SvFro(0.9))
    assert t.kept_rank == 1 and t.retained_fro == 1.0
    assert t.up.shape == (30, 1) and t.down.shape == (1, 20)
    assert not t.up.any() and not t.down.any()


def test_non_finite_factors_are_a_user_error():
    up = randn(30, 4, seed=35)
    up[3, 1] = float("nan")
    with pytest.raises(AdapterzooError, match="NaN"):
        truncate(up, randn(4, 20, seed=36), 1.0, Rank(2))


def test_mismatched_ranks_are_a_user_error():
    with pytest.raises(AdapterzooError, match="rank"):
        truncate(randn(30, 4, seed=37), randn(5, 20, seed=38), 1.0, Rank(2))


@pytest.mark.parametrize("make", [lambda: Rank(0), lambda: SvRatio(0.5), lambda: SvFro(0.0), lambda: SvFro(1.5),
                                  lambda: SvCumulative(-0.1)])
def test_out_of_range_rules_are_user_errors(make):
    with pytest.raises(AdapterzooError):
        make()


# --- concat and svd_merge: LoRA + LoRA -------------------------------------------------------------------


def three_loras(conv: bool = False) -> list[tuple[torch.Tensor, torch.Tensor, float, float]]:
    if conv:
        return [(randn(20, r, 1, 1, seed=40 + r), randn(r, 8, 3, 3, seed=50 + r), s, w)
                for r, s, w in ((4, 0.5, 1.0), (6, 1.0, -0.7), (3, 2.0, 0.4))]
    return [(randn(60, r, seed=40 + r), randn(r, 50, seed=50 + r), s, w)
            for r, s, w in ((4, 0.5, 1.0), (6, 1.0, -0.7), (3, 2.0, 0.4))]


def weighted_sum(pairs) -> torch.Tensor:
    return sum(w * s * delta(up.double(), down.double()) for up, down, s, w in pairs)


def as_modules(pairs) -> list[tuple[LoraModule, float]]:
    """(up, down, scale, weight) as svd_merge's (module, weight) members: alpha = scale · rank."""
    return [(LoraModule(down, up, scale * down.shape[0], (up.shape[0], *down.shape[1:])), weight)
            for up, down, scale, weight in pairs]


@pytest.mark.parametrize("conv", [False, True])
def test_concat_is_exact(conv):
    pairs = three_loras(conv)
    up, down = concat(pairs)
    assert up.shape[1] == down.shape[0] == 13
    assert up.dim() == down.dim() == (4 if conv else 2)
    torch.testing.assert_close(delta(up.double(), down.double()), weighted_sum(pairs), rtol=1e-5, atol=1e-5)


def test_concat_refuses_loras_of_different_weights():
    with pytest.raises(AdapterzooError, match="different weights"):
        concat([(randn(20, 4, seed=60), randn(4, 8, seed=61), 1.0, 1.0),
                (randn(20, 4, seed=62), randn(4, 9, seed=63), 1.0, 1.0)])


@pytest.mark.parametrize("conv", [False, True])
def test_svd_merge_is_the_truncated_svd_of_the_weighted_sum(conv):
    # 13 < min(60, 50) takes the factor path; for the conv, 13 >= min(20, 72) the explicit sum.
    pairs = three_loras(conv)
    t = svd_merge(as_modules(pairs), Rank(5), CPU)
    assert t.down.shape[1:] == pairs[0][1].shape[1:]
    assert_optimal(t, weighted_sum(pairs), 5)


def test_svd_merge_at_weight_zero_is_a_zero_module():
    up, down = randn(20, 4, seed=64), randn(4, 8, seed=65)
    t = svd_merge(as_modules([(up, down, 1.0, 0.0), (up, down, 0.5, 0.0)]), SvRatio(2.0), CPU)
    assert t.kept_rank == 1 and t.retained_fro == 1.0
    assert t.up.shape == (20, 1) and t.down.shape == (1, 8) and not (t.up @ t.down).any()


# --- extract: the difference of two checkpoints ----------------------------------------------------------


def test_extract_recovers_an_explicit_low_rank_delta():
    true = randn(64, 6, seed=70) @ randn(6, 96, seed=71)
    t = extract(true, SvRatio(1000.0))
    assert t.kept_rank == 6
    torch.testing.assert_close(product(t), true.double(), rtol=1e-4, atol=1e-4)


def test_extract_of_a_conv_delta_gives_a_conv_lora():
    true = delta(randn(16, 5, 1, 1, seed=72), randn(5, 8, 3, 3, seed=73))
    t = extract(true, Rank(5))
    assert t.up.shape == (16, 5, 1, 1) and t.down.shape == (5, 8, 3, 3)
    torch.testing.assert_close(delta(t.up, t.down), true, rtol=1e-4, atol=1e-4)


def test_extract_is_optimal_on_a_full_rank_delta():
    full = randn(48, 72, seed=74)
    assert_optimal(extract(full, SvFro(0.7)), full, extract(full, SvFro(0.7)).kept_rank)


def test_extract_of_a_small_rank_from_a_large_matrix_is_near_optimal_and_reproducible():
    # Rank 8 of 256 x 640 takes the randomized path; a slowly decaying spectrum is its hard case.
    full = slowly_decaying(256, 640)
    t = extract(full, Rank(8))
    _, s, _ = reference_svd(full)
    optimal_error = float(s[8:].square().sum().sqrt())
    assert float(torch.linalg.norm(full.double() - product(t))) <= 1.01 * optimal_error
    assert t.retained_fro == pytest.approx(float(s[:8].norm() / s.norm()), rel=1e-3)
    again = extract(full, Rank(8))
    assert torch.equal(again.up, t.up) and torch.equal(again.down, t.down)


def test_extract_of_identical_weights_is_none():
    assert extract(torch.zeros(32, 16, 3, 3), Rank(4)) is None


# --- devices ----------------------------------------------------------------------------------------------


def test_pick_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ops_device, "_mps_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(ops_device, "_mps_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cpu") == torch.device("cpu")


def test_asking_for_an_absent_accelerator_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ops_device, "_mps_available", lambda: False)
    for name in ("cuda", "mps", "tpu"):
        with pytest.raises(AdapterzooError) as info:
            pick_device(name)
        assert "\n" not in str(info.value) and name in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_results_equal_cpu_results():
    cuda = pick_device("cuda")
    up, down = randn(320, 32, seed=80), randn(32, 768, 1, 1, seed=81)
    pairs = three_loras()
    full = slowly_decaying(256, 640)
    results = {}
    for device in (torch.device("cpu"), cuda):
        moved = [(u.to(device), d.to(device), s, w) for u, d, s, w in pairs]
        results[device.type] = (truncate(up.to(device), down.to(device), 0.5, SvFro(0.9)),
                                svd_merge(moved, Rank(6)), extract(full.to(device), Rank(8)))
    for on_cpu, on_cuda in zip(results["cpu"], results["cuda"]):
        assert on_cuda.up.device.type == "cuda" and on_cuda.kept_rank == on_cpu.kept_rank
        assert on_cuda.retained_fro == pytest.approx(on_cpu.retained_fro, rel=1e-4)
        torch.testing.assert_close(product(on_cuda).cpu(), product(on_cpu), rtol=1e-3, atol=1e-4)
