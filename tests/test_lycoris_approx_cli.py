"""LyCORIS modules through the real command line: `convert --rank`, `resize` and `merge-loras --method svd` write the
best rank-k LoRA of each LoHa, LoKr and full module's ΔW, as a dense SVD of that ΔW gives it.

References are plain torch on the raw tensors (ComfyUI's and A1111's formulas: ΔW = alpha/r · kron(w1, w2)
reshaped to the weight, (w1_a w1_b) ⊙ (w2_a w2_b), diff), never adapterzoo code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import run
from deltas import kohya_deltas
from safetensors.torch import load_file, save_file

REAL = Path(__file__).resolve().parent / "fixtures" / "real"
BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # 320x320x3x3
LOHA, LOKR, FULL, LOCON = f"{BLOCK}_attn1_to_q", f"{BLOCK}_attn2_to_k", f"{BLOCK}_attn1_to_k", f"{BLOCK}_attn1_to_v"
NORM = f"{BLOCK}_norm1"  # a LayerNorm: LyCORIS' full module spells its change w_norm / b_norm


def r(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * 0.1


@pytest.fixture(scope="module")
def lycoris(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An SD1 LyCORIS file (fp32) with an early-layout LoKr conv, a LoHa, a LoKr with a full w1, a full module
    with a bias, a plain LoCon and a norm layer's change; and each module's ΔW [out, in·k·k] in float64 (not
    the norm's: no LoRA holds it)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"{CONV}.lokr_w1_a": r(g, 16, 4), f"{CONV}.lokr_w1_b": r(g, 4, 48), f"{CONV}.lokr_w2_a": r(g, 20, 4),
          f"{CONV}.lokr_w2_b": r(g, 4, 60), f"{CONV}.alpha": torch.tensor(2.0),
          f"{LOHA}.hada_w1_a": r(g, 320, 4), f"{LOHA}.hada_w1_b": r(g, 4, 320), f"{LOHA}.hada_w2_a": r(g, 320, 4),
          f"{LOHA}.hada_w2_b": r(g, 4, 320), f"{LOHA}.alpha": torch.tensor(8.0),
          f"{LOKR}.lokr_w1": r(g, 16, 24), f"{LOKR}.lokr_w2_a": r(g, 20, 2), f"{LOKR}.lokr_w2_b": r(g, 2, 32),
          f"{LOKR}.alpha": torch.tensor(1.0),
          f"{FULL}.diff": r(g, 320, 320), f"{FULL}.diff_b": r(g, 320),
          f"{LOCON}.lora_down.weight": r(g, 4, 320), f"{LOCON}.lora_up.weight": r(g, 320, 4),
          f"{LOCON}.alpha": torch.tensor(2.0), f"{NORM}.w_norm": r(g, 320), f"{NORM}.b_norm": r(g, 320)}
    t = {k: v.double() for k, v in sd.items()}
    deltas = {
        CONV: torch.kron(t[f"{CONV}.lokr_w1_a"] @ t[f"{CONV}.lokr_w1_b"], t[f"{CONV}.lokr_w2_a"] @ t[f"{CONV}.lokr_w2_b"])
        * 2.0 / 4,
        LOHA: (t[f"{LOHA}.hada_w1_a"] @ t[f"{LOHA}.hada_w1_b"]) * (t[f"{LOHA}.hada_w2_a"] @ t[f"{LOHA}.hada_w2_b"])
        * 8.0 / 4,
        LOKR: torch.kron(t[f"{LOKR}.lokr_w1"], t[f"{LOKR}.lokr_w2_a"] @ t[f"{LOKR}.lokr_w2_b"]) * 1.0 / 2,
        FULL: t[f"{FULL}.diff"],
        LOCON: t[f"{LOCON}.lora_up.weight"] @ t[f"{LOCON}.lora_down.weight"] * 2.0 / 4,
    }
    path = tmp_path_factory.mktemp("lycoris") / "mixed.safetensors"
    save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    return path, deltas


def truncated(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """The best rank-k matrix of delta (float64, 2-D) and its retained Frobenius fraction."""
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], float(s[:k].norm() / s.norm())


def assert_best(got: torch.Tensor, delta: torch.Tensor, k: int, rel: float) -> None:
    best, _ = truncated(delta, k)
    assert float(torch.linalg.norm(got - best)) <= rel * float(best.norm())


def assert_near_best(got: torch.Tensor, delta: torch.Tensor, k: int) -> None:
    """A full module's small rank comes from a randomized SVD: its error is within 1% of the optimal one."""
    best, _ = truncated(delta, k)
    assert float(torch.linalg.norm(delta - got)) <= 1.01 * float(torch.linalg.norm(delta - best))


def test_resize_truncates_loha_lokr_and_full_modules_like_a_dense_svd_keeping_names(lycoris, tmp_path, capsys,
                                                                                    monkeypatch):
    path, deltas = lycoris
    out = tmp_path / "r3.safetensors"
    code, stdout, stderr = run(["resize", str(path), "-o", str(out), "--rank", "3", "--json"], capsys, monkeypatch)
    assert (code, stderr) == (0, ""), stderr
    report = json.loads(stdout)
    written = load_file(out)
    got = kohya_deltas(written)
    assert set(got) == set(deltas)
    source = load_file(path)
    assert all(torch.equal(written[f"{NORM}.{part}"], source[f"{NORM}.{part}"]) for part in ("w_norm", "b_norm"))
    assert report["passed_through"] == 2
    rows = {row["module"]: row for row in report["modules"]}
    for name, delta in deltas.items():
        if name == FULL:
            assert_near_best(got[name], delta, 3)
            fraction = float(got[name].norm() / delta.norm())  # what was kept, against the whole ‖ΔW‖_F
        else:
            assert_best(got[name], delta, 3, 1e-5)
            fraction = truncated(delta, 3)[1]
        assert rows[name]["kept_rank"] == 3 and float(written[f"{name}.alpha"]) == 3
        assert rows[name]["retained_fro"] == pytest.approx(fraction, rel=1e-5), name
    assert written[f"{CONV}.lora_down.weight"].shape == (3, 320, 3, 3)
    assert written[f"{CONV}.lora_up.weight"].shape == (320, 3, 1, 1)
    assert report["warnings"] == [("1 full module(s) also change a bias (diff_b); a LoRA carries no bias, "
                                   "so that part is left out")]


def test_merge_loras_svd_sums_lycoris_and_lora_modules_like_a_dense_svd(lycoris, tmp_path, capsys, monkeypatch):
    path, deltas = lycoris
    g = torch.Generator().manual_seed(1)
    plain = {}
    for name, delta in deltas.items():
        kernel = (3, 3) if name == CONV else ()
        plain[f"{name}.lora_down.weight"] = r(g, 2, delta.shape[1] // (9 if kernel else 1), *kernel)
        plain[f"{name}.lora_up.weight"] = r(g, delta.shape[0], 2, *((1, 1) if kernel else ()))
        plain[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(plain, str(tmp_path / "plain.safetensors"))
    plain_deltas = kohya_deltas(plain)
    out = tmp_path / "merged.safetensors"
    code, _, stderr = run(["merge-loras", f"{path}:0.5", f"{tmp_path / 'plain.safetensors'}:-1", "-o", str(out),
                           "--method", "svd", "--rank", "4"], capsys, monkeypatch)
    assert (code, stderr) == (0, ""), stderr
    written = load_file(out)
    got = kohya_deltas(written)
    assert len(got) == len(deltas)
    source = load_file(path)
    assert torch.allclose(written[f"{NORM}.w_norm"], 0.5 * source[f"{NORM}.w_norm"])  # summed exactly
    for name, delta in deltas.items():
        total = 0.5 * delta.reshape(delta.shape[0], -1) - plain_deltas[name]
        (assert_near_best(got[name], total, 4) if name == FULL else assert_best(got[name], total, 4, 1e-5))


def test_convert_rank_of_a_real_early_lycoris_lokr_file_is_the_dense_svds_truncation(tmp_path, capsys, monkeypatch):
    """smart_falcon_4_lokr (LyCORIS' own April 2023 result): both factors decomposed, convs with the kernel in
    both factors. The output is fp16 like the input, so ΔW matches to fp16's precision; the report's fractions
    are computed before that rounding."""
    src = REAL / "smart_falcon_4_lokr.safetensors"
    out = tmp_path / "falcon_r4.safetensors"
    code, stdout, stderr = run(["convert", str(src), "-o", str(out), "--to", "kohya", "--rank", "4", "--json"],
                               capsys, monkeypatch)
    assert (code, stderr) == (0, ""), stderr
    report = json.loads(stdout)
    assert report["modules"] == 350 and 0 < report["approximation"]["retained_fro"] < 1
    raw = {k: v.double() for k, v in load_file(src).items()}
    written = load_file(out)
    conv = "lora_unet_down_blocks_0_resnets_1_conv1"  # resnets.0's convs are all zero in this file
    checked = {conv: "unet.down_blocks.0.resnets.1.conv1",
               "lora_unet_down_blocks_0_attentions_0_proj_in": "unet.down_blocks.0.attentions.0.proj_in",
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "text_encoder.encoder.layers.0.self_attn.q_proj"}
    got = kohya_deltas({k: v for k, v in written.items() if k.split(".")[0] in checked})
    for name, path in checked.items():
        w1 = raw[f"{name}.lokr_w1_a"] @ raw[f"{name}.lokr_w1_b"]
        w2 = raw[f"{name}.lokr_w2_a"] @ raw[f"{name}.lokr_w2_b"]
        delta = torch.kron(w1, w2) * float(raw[f"{name}.alpha"]) / raw[f"{name}.lokr_w1_b"].shape[0]
        assert written[f"{name}.lora_down.weight"].dtype == torch.float16
        assert_best(got[name], delta, 4, 2e-3)
        assert report["approximation"]["modules"][path] == pytest.approx(truncated(delta, 4)[1], rel=1e-5), name
    assert written[f"{conv}.lora_down.weight"].shape == (4, 320, 3, 3)


def test_convert_rank_keeps_a_norm_layers_change_in_kohya_and_no_other_dialect_takes_it(lycoris, tmp_path, capsys,
                                                                                     monkeypatch):
    path, deltas = lycoris
    out = tmp_path / "k.safetensors"
    code, stdout, stderr = run(["convert", str(path), "-o", str(out), "--to", "kohya", "--rank", "3", "--json"],
                               capsys, monkeypatch)
    assert (code, stderr) == (0, ""), stderr
    written, source = load_file(out), load_file(path)
    assert torch.equal(written[f"{NORM}.w_norm"], source[f"{NORM}.w_norm"])
    got = kohya_deltas(written)
    assert_best(got[LOKR], deltas[LOKR], 3, 1e-5)
    assert json.loads(stdout)["warnings"] == [("1 full module(s) also change a bias (diff_b); a LoRA carries no "
                                               "bias, so that part is left out")]
    code, _, stderr = run(["convert", str(path), "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers",
                           "--rank", "3"], capsys, monkeypatch)
    assert code == 1 and "norm-layer change(s)" in stderr and stderr.count("\n") == 1


def test_lokr_factors_that_do_not_fit_each_other_are_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.safetensors"
    save_file({f"{LOKR}.lokr_w1": torch.ones(16, 24), f"{LOKR}.lokr_w2_a": torch.ones(20, 2),
               f"{LOKR}.lokr_w2_b": torch.ones(3, 32), f"{LOKR}.alpha": torch.tensor(1.0)}, str(bad))
    code, _, stderr = run(["convert", str(bad), "-o", str(tmp_path / "o.safetensors"), "--to", "kohya", "--rank", "2",
                           "--base", "sd1"], capsys, monkeypatch)
    assert code == 1 and stderr.count("\n") == 1
    assert "its factors do not form a [320, 768] change ([20, 2] @ [3, 32])" in stderr
