"""The README's first command: `adapterzoo demo` runs offline and tells each kind apart."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run as run_in_process
from PIL import Image


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """One `adapterzoo demo` as a user runs it, in its own process; its output and folder, which the tests only
    read."""
    out = tmp_path_factory.mktemp("demo") / "tour"
    done = subprocess.run([sys.executable, "-m", "adapterzoo", "demo", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    return done, out


def test_demo_indexes_every_kind_and_flags_bad_files(tour):
    run, out = tour
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    sections = {part.split("\n", 1)[0]: part for part in run.stdout.split("\n== ")}
    scan = next(text for title, text in sections.items() if title.startswith("Index it"))
    rows = {line.split()[-1]: line.split() for line in scan.splitlines()
            if line.endswith((".safetensors", ".pt", ".ckpt", "tiny-sd1"))}
    assert rows["tiny-sd1"][:3] == ["checkpoint", "sd1", "diffusers"]
    assert rows["tiny-sd1-style.safetensors"][:5] == ["lora", "sd1", "kohya", "4", "2.0"]
    assert rows["tiny-sd1-untrained.safetensors"][:3] == ["lora", "sd1", "kohya"]
    assert rows["tiny-token.pt"][:3] == ["embedding", "sd1", "a1111"]
    assert rows["tiny-hypernetwork.pt"][:3] == ["hypernetwork", "sd1", "a1111"]
    assert rows["half-downloaded.safetensors"][-2] == "broken"
    assert rows["needs-code.ckpt"][-2] == "unsafe"
    assert "this would have run" not in run.stdout + run.stderr
    assert "7 indexed, 0 unchanged, 1 broken, 1 unsafe, 0 missing" in run.stdout
    for line in ("checkpoint    diffusers  ldm", "embedding     a1111      kohya", "hypernetwork  a1111      safetensors",
                 "lora          kohya      diffusers"):
        assert line in run.stdout
    assert "52 weights changed" in run.stdout
    assert "100.0000% of the difference kept" in run.stdout  # extract(merge(base, L)) gives L back, rank 4

    verify = next(text for title, text in sections.items() if title.startswith("Verify every file"))
    verdicts = {line.split()[2]: (line.split()[0], " ".join(line.split()[3:])) for line in verify.splitlines()[2:]
                if line.startswith(("pass ", "fail "))}
    assert verdicts == {
        "tiny-sd1": ("pass", ""), "tiny-sd1-style.safetensors": ("pass", ""), "tiny-token.pt": ("pass", ""),
        "tiny-hypernetwork.pt": ("pass", ""),
        "tiny-sd1-untrained.safetensors": ("fail", "no effect: every lora_up is zero"),
        "half-downloaded.safetensors": ("fail", verdicts["half-downloaded.safetensors"][1]),
        "needs-code.ckpt": ("fail", verdicts["needs-code.ckpt"][1])}
    assert verdicts["half-downloaded.safetensors"][1].startswith("broken: file is truncated")
    assert verdicts["needs-code.ckpt"][1].startswith("unsafe: unsafe pickle: it would import builtins.print")
    assert "5 verified: 4 pass, 1 fail; 2 skipped (1 broken, 1 unsafe)" in verify
    sheet = (out / "verify" / "index.html").read_text()
    assert sheet.count('class="card"') == 7 and len(list((out / "verify").glob("*.png"))) == 5
    assert "LoRA per pass of the loop: [0, 1, 0, 1, 0]" in run.stdout  # switch every pass, PNDM's 4 steps = 5
    with Image.open(out / "sample" / "switch.png") as image:
        assert image.size == (64, 64) and "Compose: switch" in image.text["parameters"]


def test_demo_outputs_load_where_users_load_them(tour):
    """The merged folder loads in diffusers; the extracted LoRA equals the merged one's delta."""
    done, out = tour
    assert done.returncode == 0, done.stderr
    from diffusers import UNet2DConditionModel

    from adapterzoo.formats.checkpoint_targets import checkpoint_targets
    from adapterzoo.formats.lora.lora_read import load_lora

    base = UNet2DConditionModel.from_pretrained(out / "models/Stable-diffusion/tiny-sd1", subfolder="unet")
    merged = UNet2DConditionModel.from_pretrained(out / "ops/tiny-sd1-styled", subfolder="unet")
    architecture = checkpoint_targets(out / "models/Stable-diffusion/tiny-sd1").architecture
    lora = load_lora(out / "models/Lora/tiny-sd1-style.safetensors", architecture=architecture)
    extracted = load_lora(out / "ops/tiny-sd1-style.extracted.safetensors", architecture=architecture)
    weights = dict(base.named_parameters())
    changed = dict(merged.named_parameters())
    unet_modules = {p: m for p, m in lora.modules.items() if p.startswith("unet.")}
    assert unet_modules
    for path, module in unet_modules.items():
        key = path.removeprefix("unet.") + ".weight"
        expected = weights[key] + 0.8 * module.delta(weights[key]).reshape(weights[key].shape)
        torch.testing.assert_close(changed[key], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(extracted.modules[path].delta(weights[key]).reshape(weights[key].shape),
                                   changed[key] - weights[key], rtol=1e-3, atol=1e-4)


def test_demo_refuses_a_folder_with_files(tmp_path, capsys, monkeypatch):
    (tmp_path / "mine.txt").write_text("keep me")
    code, _, err = run_in_process(["demo", "--out", str(tmp_path)], capsys, monkeypatch)
    assert code == 1
    assert err.strip().count("\n") == 0 and "not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
