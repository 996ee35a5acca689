"""`verify --quick` (coverage and effect from noise predictions, recorded as quick) and the checkpoint's own
renders kept between runs, so a second pass over a grown library renders only what is new (issue 15 §2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run
from test_verify import SIZE, kohya_file, sha256

from adapterzoo import tiny_models
from adapterzoo.verify.verifier import Verifier, VerifyOptions

FAST = ["--steps", "1", "--size", "64x64"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("quick")
    folder = tiny_models.save_tiny_pipeline("sd1", root / "pipeline", seed=1)
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    return (folder, kohya_file(pipe, "sd1", root / "good.safetensors"),
            kohya_file(pipe, "sd1", root / "zero.safetensors", zero_up=True))


def test_quick_judges_from_noise_predictions_and_list_and_show_say_so(tiny, tmp_path, capsys, monkeypatch):
    folder, good, zero = tiny
    code, out, err = run(["verify", str(good), str(zero), "--checkpoint", str(folder), "--quick", *FAST, "--json"],
                         capsys, monkeypatch)
    assert code == 1, err
    passed, failed = json.loads(out)
    assert (passed["verdict"], passed["quick"], passed["grid"]) == ("pass", True, None)
    assert passed["coverage"]["modules_hit"] == passed["coverage"]["modules_total"] > 0
    assert [e["mean_abs_pixel_change"] for e in passed["effects"]] == [None, None, None]
    assert passed["effects"][0]["noise_pred_rel_change"] == 0 < passed["effects"][2]["noise_pred_rel_change"]
    assert (failed["verdict"], failed["reasons"]) == ("fail", ["no effect: every lora_up is zero"])
    full = Verifier(folder, VerifyOptions(steps=1, size=SIZE), sha256).verify(good, None)
    assert [e["noise_pred_rel_change"] for e in full["effects"]] == pytest.approx(
        [e["noise_pred_rel_change"] for e in passed["effects"]], rel=1e-4, abs=1e-7)

    code, out, _ = run(["list"], capsys, monkeypatch)
    assert "pass (quick)" in out and "fail (quick)" in out
    code, out, _ = run(["show", str(good), "--json"], capsys, monkeypatch)
    assert json.loads(out)["verification"]["quick"] is True
    code, out, _ = run(["show", str(good)], capsys, monkeypatch)
    assert "verified       pass (quick: noise predictions only, no grid) on" in out
    code, _, err = run(["verify", str(good), "--checkpoint", str(folder), "--quick", "-o", str(tmp_path / "g.png")],
                       capsys, monkeypatch)
    assert code == 2 and "--quick renders no grid" in err


def test_registry_on_cpu_is_quick_unless_grid_is_asked_for(tiny, tmp_path, capsys, monkeypatch):
    folder, good, _ = tiny
    assert run(["scan", str(folder), str(good)], capsys, monkeypatch)[0] == 0
    code, out, err = run(["verify", "--registry", "--kind", "lora", "--out-dir", str(tmp_path / "q"), *FAST,
                          "--device", "cpu", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert [(r["quick"], r["grid"]) for r in json.loads(out)] == [(True, None)]
    code, out, err = run(["verify", "--registry", "--kind", "lora", "--out-dir", str(tmp_path / "g"), *FAST,
                          "--device", "cpu", "--grid", "--json"], capsys, monkeypatch)
    assert code == 0, err
    [result] = json.loads(out)
    assert result["quick"] is False and Path(result["grid"]).is_file()


def test_a_second_run_takes_the_checkpoints_own_renders_from_the_cache(tiny, tmp_path, monkeypatch):
    folder, good, _ = tiny
    renders, predictions = [], []
    real_render, real_prediction = Verifier._render, Verifier._prediction
    monkeypatch.setattr(Verifier, "_render", lambda self, loaded, prompt, seed, insert: (
        renders.append(dict(insert)), real_render(self, loaded, prompt, seed, insert))[1])
    monkeypatch.setattr(Verifier, "_prediction", lambda self, prompt, insert: (
        predictions.append(dict(insert)), real_prediction(self, prompt, insert))[1])
    options = VerifyOptions(steps=1, size=SIZE)
    first = Verifier(folder, options, sha256, tmp_path / "cache").verify(good, None)
    assert (len(renders), len(predictions)) == (4, 4)  # the checkpoint alone, then each of 3 multipliers
    renders.clear(), predictions.clear()
    again = Verifier(folder, options, sha256, tmp_path / "cache")
    second = again.verify(good, None)
    assert (len(renders), len(predictions), again.cache.hits) == (3, 3, 2)
    assert second["verdict"] == first["verdict"] == "pass"
    assert second["effects"] == first["effects"]
    renders.clear(), predictions.clear()
    other = Verifier(folder, VerifyOptions(steps=2, size=SIZE), sha256, tmp_path / "cache")
    other.verify(good, None)
    assert (len(renders), other.cache.hits) == (4, 1)  # other steps: rendered anew; the prediction is the same
