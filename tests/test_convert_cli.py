"""`adapterzoo convert` through the real entry point: conversions, reports, and one-line refusals."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import factory
import pytest
import torch
from cli_helpers import run
from safetensors.torch import load_file

from adapterzoo.formats.probe import probe

REAL = factory.REAL




def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def embedding(tmp_path) -> tuple[Path, torch.Tensor]:
    vectors = torch.randn(2, 768, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "concept.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "concept", "step": 3}, path)
    return path, vectors


@pytest.fixture
def lora(tmp_path) -> Path:
    """A real cloneofsimo LoRA with two embedded tokens (copied: fixtures are read-only)."""
    return Path(shutil.copy(REAL / "lora_disney.safetensors", tmp_path / "lora_disney.safetensors"))


@pytest.fixture
def hypernetwork(tmp_path) -> Path:
    torch.manual_seed(0)
    pair = tuple({"linear.0.weight": torch.randn(640, 320), "linear.0.bias": torch.randn(640),
                  "linear.1.weight": torch.randn(320, 640), "linear.1.bias": torch.randn(320)} for _ in range(2))
    path = tmp_path / "hn.pt"
    torch.save({320: pair, "name": "hn", "layer_structure": [1, 2, 1], "activation_func": "linear",
                "is_layer_norm": False, "activate_output": False, "dropout_structure": [0, 0, 0]}, path)
    return path


def test_embedding_converts_with_a_short_summary_and_a_json_report(embedding, tmp_path, capsys, monkeypatch):
    src, vectors = embedding
    out = tmp_path / "learned_embeds.safetensors"
    code, stdout, stderr = run(["convert", str(src), "-o", str(out), "--to", "diffusers", "--token", "<c>"],
                               capsys, monkeypatch)
    assert (code, stderr) == (0, "")
    assert "embedding a1111 -> diffusers" in stdout and str(out) in stdout
    assert torch.equal(load_file(out)["<c>"], vectors)

    code, stdout, _ = run(["convert", str(out), "-o", str(tmp_path / "back.pt"), "--to", "a1111", "--json"],
                          capsys, monkeypatch)
    report = json.loads(stdout)
    assert code == 0 and report["kind"] == "embedding" and report["from"] == "diffusers" and report["to"] == "a1111"
    assert report["token"] == "<c>" and report["vectors"] == 2 and report["outputs"] == [str(tmp_path / "back.pt")]
    assert torch.equal(torch.load(tmp_path / "back.pt", weights_only=True)["string_to_param"]["*"], vectors)


def test_hypernetwork_round_trip_through_the_cli(hypernetwork, tmp_path, capsys, monkeypatch):
    st, back = tmp_path / "hn.safetensors", tmp_path / "back.pt"
    assert run(["convert", str(hypernetwork), "-o", str(st), "--to", "safetensors"], capsys, monkeypatch)[0] == 0
    code, stdout, _ = run(["convert", str(st), "-o", str(back), "--to", "a1111", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(stdout)["widths"] == [320]
    original, written = torch.load(hypernetwork, weights_only=True), torch.load(back, weights_only=True)
    for side in (0, 1):
        assert original[320][side].keys() == written[320][side].keys()
        assert all(torch.equal(written[320][side][k], v) for k, v in original[320][side].items())


def test_existing_output_needs_force_and_is_left_alone_without_it(embedding, tmp_path, capsys, monkeypatch):
    src, vectors = embedding
    out = tmp_path / "k.safetensors"
    out.write_bytes(b"precious")
    code, stdout, stderr = run(["convert", str(src), "-o", str(out), "--to", "kohya"], capsys, monkeypatch)
    assert code == 1 and stdout == "" and stderr.count("\n") == 1
    assert stderr.startswith("error: ") and "--force" in stderr and out.read_bytes() == b"precious"
    code, _, _ = run(["convert", str(src), "-o", str(out), "--to", "kohya", "--force"], capsys, monkeypatch)
    assert code == 0 and torch.equal(load_file(out)["emb_params"], vectors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concept.pt", "k.safetensors"]  # no temp left behind


def test_output_that_is_the_input_is_refused_even_with_force(hypernetwork, capsys, monkeypatch):
    before = sha256(hypernetwork)
    code, _, stderr = run(["convert", str(hypernetwork), "-o", str(hypernetwork), "--to", "a1111", "--force"],
                          capsys, monkeypatch)
    assert code == 1 and stderr.count("\n") == 1 and "one of the inputs" in stderr
    assert sha256(hypernetwork) == before


@pytest.mark.parametrize(
    ("fixture", "to", "targets"),
    [("embedding", "peft", "a1111 | kohya | diffusers"), ("hypernetwork", "kohya", "safetensors | a1111")],
)
def test_target_that_does_not_fit_the_kind_names_the_kinds_targets(fixture, to, targets, request, tmp_path, capsys,
                                                                 monkeypatch):
    src = request.getfixturevalue(fixture)
    src = src[0] if isinstance(src, tuple) else src
    out = tmp_path / "out.safetensors"
    code, _, stderr = run(["convert", str(src), "-o", str(out), "--to", to], capsys, monkeypatch)
    assert code == 1 and stderr.count("\n") == 1 and targets in stderr and not out.exists()


@pytest.mark.parametrize(
    ("fixture", "to", "option", "kind"),
    [
        ("hypernetwork", "safetensors", ["--rank", "4"], "a hypernetwork"),
        ("embedding", "kohya", ["--prune-ema"], "an embedding"),
        ("lora", "kohya", ["--dtype", "fp16"], "a lora"),
    ],
)
def test_option_of_another_kind_is_refused(fixture, to, option, kind, request, tmp_path, capsys, monkeypatch):
    src = request.getfixturevalue(fixture)
    src = src[0] if isinstance(src, tuple) else src
    code, _, stderr = run(["convert", str(src), "-o", str(tmp_path / "x.safetensors"), "--to", to, *option],
                          capsys, monkeypatch)
    assert code == 1 and stderr == f"error: {option[0]} does not apply to {kind}\n"


def test_lora_goes_to_the_lora_converter_and_every_written_file_is_listed(lora, tmp_path, capsys, monkeypatch):
    out = tmp_path / "disney_kohya.safetensors"
    code, stdout, stderr = run(["convert", str(lora), "-o", str(out), "--to", "kohya", "--json"], capsys, monkeypatch)
    report = json.loads(stdout)
    assert (code, stderr) == (0, "")
    assert (report["kind"], report["from"], report["to"]) == ("lora", "cloneofsimo", "kohya")
    assert report["outputs"][0] == str(out) and len(report["outputs"]) == 3  # the LoRA and its two tokens
    assert all(Path(p).is_file() and Path(p).parent == tmp_path for p in report["outputs"])
    assert (probe(out).kind, probe(out).format) == ("lora", "kohya")


def test_unknown_format_is_a_usage_error(embedding, tmp_path, capsys, monkeypatch):
    code, _, stderr = run(["convert", str(embedding[0]), "-o", str(tmp_path / "x"), "--to", "onnx"], capsys,
                          monkeypatch)
    assert code == 2 and "onnx" in stderr


class _RunsShell:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_hostile_pickle_is_refused_as_unsafe_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    hostile = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": _RunsShell(f"touch {marker}")}, "name": "evil"}, hostile)
    done = subprocess.run(
        [sys.executable, "-m", "adapterzoo", "convert", str(hostile), "-o", str(tmp_path / "evil.safetensors"),
         "--to", "kohya"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "unsafe" in done.stderr
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
