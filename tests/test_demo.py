"""The README's first command: `adapterzoo demo` runs offline and tells each kind apart."""

import subprocess
import sys


def test_demo_indexes_every_kind_and_flags_bad_files(tmp_path):
    out = tmp_path / "tour"
    run = subprocess.run([sys.executable, "-m", "adapterzoo", "demo", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    rows = {line.split()[-1]: line.split() for line in run.stdout.splitlines()
            if line.endswith((".safetensors", ".pt", ".ckpt", "tiny-sd1")) and not line.startswith("models/")}
    assert rows["tiny-sd1"][:3] == ["checkpoint", "sd1", "diffusers"]
    assert rows["tiny-sd1-style.safetensors"][:5] == ["lora", "sd1", "kohya", "4", "2.0"]
    assert rows["tiny-token.pt"][:3] == ["embedding", "sd1", "a1111"]
    assert rows["tiny-hypernetwork.pt"][:3] == ["hypernetwork", "sd1", "a1111"]
    assert rows["half-downloaded.safetensors"][-2] == "broken"
    assert rows["needs-code.ckpt"][-2] == "unsafe"
    assert "this would have run" not in run.stdout + run.stderr
    assert "6 indexed, 0 unchanged, 1 broken, 1 unsafe, 0 missing" in run.stdout


def test_demo_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    run = subprocess.run([sys.executable, "-m", "adapterzoo", "demo", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "not empty" in run.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
