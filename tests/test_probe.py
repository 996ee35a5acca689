"""`adapterzoo probe` on one file per kind/base/format row, on broken files and on hostile pickles.

The files come from tests/factory.py (real tools where they exist, real widths otherwise) plus
the two real cloneofsimo LoRAs; each case carries the answer computed from what was written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import factory
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from adapterzoo.cli import cli, main


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("probe")


@pytest.fixture(scope="session")
def built(root):
    """Build each case once, on first use."""
    cache: dict[str, factory.Case] = {}

    def get(name: str) -> factory.Case:
        if name not in cache:
            cache[name] = factory.build(name, root)
        return cache[name]

    return get


def probe_json(path: Path) -> dict:
    result = CliRunner().invoke(cli, ["probe", str(path), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def some_keys(path: Path, n: int = 6) -> list[str]:
    """A few tensor names of the file, for a readable failure message."""
    if path.is_dir() or path.suffix != ".safetensors":
        return [str(p.relative_to(path)) for p in sorted(path.rglob("*"))][:n] if path.is_dir() else []
    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())[:n]


def mismatches(case: factory.Case, got: dict) -> dict:
    wrong = {k: (v, got.get(k)) for k, v in case.expect.items() if got.get(k) != v}
    for key, value in case.details.items():
        seen = got["details"].get(key)
        if isinstance(value, list) and isinstance(seen, list):
            seen, value = sorted(seen), sorted(value)
        if seen != value:
            wrong[f"details.{key}"] = (value, seen)
    return wrong


@pytest.mark.parametrize("name", list(factory.CASES))
def test_probe_recognises(built, name):
    case = built(name)
    got = probe_json(case.path)
    wrong = mismatches(case, got)
    assert not wrong, f"{name}: (expected, got) {wrong}; details {got['details']}; keys {some_keys(case.path)}"


def test_disney_lists_its_two_embedded_tokens(built):
    details = probe_json(built("cloneofsimo-disney").path)["details"]
    assert any(isinstance(v, (list, dict)) and {"<s1>", "<s2>"} <= set(v) for v in details.values()), details


def test_analog_has_no_embedded_tokens(built):
    details = probe_json(built("cloneofsimo-analog").path)["details"]
    assert not any(isinstance(v, (list, dict)) and any(str(t).startswith("<s") for t in v) for v in details.values())


def test_flux_dev_and_schnell_are_told_apart(built):
    dev, schnell = (probe_json(built(n).path) for n in ("ckpt-flux-dev", "ckpt-flux-schnell"))
    assert dev["base"] == schnell["base"] == "flux"
    assert dev["details"] != schnell["details"], "guidance_in is the only difference: details should show it"


# ----------------------------------------------------------------------------------------------
# The factory itself must match FORMATS.md, or the rows above prove nothing


def test_factory_kohya_module_counts_match_formats_md():
    te = len(factory.te_targets("clip_l", "lora_te"))
    assert (te, len(factory.unet_targets("sd1", ldm=False))) == (72, 192)
    assert len(factory.te_targets("bigg", "lora_te2")) == 192
    sdxl = factory.unet_targets("sdxl", ldm=True)
    assert len(sdxl) == 722
    assert sdxl["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"] == (640, 2048)
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0" in sdxl
    assert sdxl["lora_unet_output_blocks_0_1_proj_in"] == (1280, 1280)


def test_factory_ldm_names_follow_the_block_arithmetic():
    sd1 = factory.unet_ldm_specs("sd1", "F16")
    assert sd1["output_blocks.2.1.conv.weight"][1] == (1280, 1280, 3, 3)  # SD1 upsampler after a resnet-only block
    assert sd1["input_blocks.3.0.op.weight"][1] == (320, 320, 3, 3)
    assert sd1["middle_block.1.proj_in.weight"][1] == (1280, 1280, 1, 1)
    sdxl = factory.unet_ldm_specs("sdxl", "F16")
    assert sdxl["output_blocks.2.2.conv.weight"][1] == (1280, 1280, 3, 3)
    assert "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight" in sdxl


def test_sparse_checkpoints_are_valid_safetensors(built):
    path = built("ckpt-sd1-ldm").path
    assert path.stat().st_blocks * 512 < 5e6 < path.stat().st_size
    with safe_open(str(path), "pt") as fh:
        weight = fh.get_tensor("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    assert tuple(weight.shape) == (320, 768) and not weight.any()


# ----------------------------------------------------------------------------------------------
# Through the real console script


def console() -> list[str]:
    exe = shutil.which("adapterzoo")
    return [exe] if exe else [sys.executable, "-m", "adapterzoo"]


def run_console(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*console(), *args], capture_output=True, text=True, timeout=120)


def test_console_script_prints_json(built):
    case = built("kohya-sdxl-ldm")
    proc = run_console("probe", str(case.path), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert not mismatches(case, got)


def test_console_script_table(built):
    proc = run_console("probe", str(built("embedding-kohya-sdxl").path))
    assert proc.returncode == 0, proc.stderr
    rows = dict(line.split(None, 1) for line in proc.stdout.splitlines() if line.strip())
    assert rows["kind"] == "embedding" and rows["base"] == "sdxl"


def test_console_script_bad_file_is_one_line(root):
    path = factory.BAD["truncated.safetensors"](root)
    proc = run_console("probe", str(path))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:"), proc.stderr


def test_console_script_refuses_hostile_pickle(root):
    evil = factory.hostile("os-system", ".pt", root / "console")
    proc = run_console("probe", str(evil.path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unsafe" in proc.stderr.lower()
    assert not evil.marker.exists()


# ----------------------------------------------------------------------------------------------
# Every broken and hostile file, through main() in-process (the console script's own code path)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["adapterzoo", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def bad_folder(root) -> Path:
    folder = root / "bad"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("name", list(factory.BAD))
def test_bad_file_exits_1_with_one_line(bad_folder, monkeypatch, capsys, name):
    path = factory.BAD[name](bad_folder)
    code, out, err = run_main(monkeypatch, capsys, "probe", str(path), "--json")
    assert code == 1, f"{name}: exit {code}, stdout {out[:300]!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert json.loads(out) == {"error": lines[0].removeprefix("error: ")}  # --json callers get it as JSON too


@pytest.mark.parametrize("suffix", factory.HOSTILE_CONTAINERS)
@pytest.mark.parametrize("payload", factory.HOSTILE_PAYLOADS)
def test_hostile_pickle_is_refused_and_never_run(root, monkeypatch, capsys, payload, suffix):
    evil = factory.hostile(payload, suffix, root / "hostile")
    code, out, err = run_main(monkeypatch, capsys, "probe", str(evil.path))
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "unsafe" in err.lower(), err
    assert not evil.marker.exists(), "the payload ran"


def test_hostile_payloads_really_are_live(root):
    """Guard for the test above: unpickled without protection, each payload does create its marker."""
    import pickle

    for payload in factory.HOSTILE_PAYLOADS:
        evil = factory.hostile(payload, ".bin", root / "live")
        with open(evil.path, "rb") as fh:
            obj = pickle.load(fh)  # noqa: S301 - deliberately, in a temp folder, to prove the payload works
        if payload == "subprocess-popen":
            obj["evil"].wait()
        if payload == "builtins-open":
            obj["evil"].close()
        assert evil.marker.exists(), payload


# ----------------------------------------------------------------------------------------------
# Probing reads headers, not gigabytes

MEASURE = r"""
import json, sys, time
from adapterzoo.formats.probe import probe

def rchar():
    return int(dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())["rchar"])

for warm in sys.argv[2:]:
    probe(warm)  # lazy imports and caches happen here, not in the measurement
report = {}
for path in sys.argv[1].split(","):
    io0, t0 = rchar(), time.perf_counter()
    kind = probe(path).kind
    report[path] = {"read": rchar() - io0, "seconds": time.perf_counter() - t0, "kind": kind}
print(json.dumps(report))
"""


def test_probe_reads_only_the_header_of_big_files(built, root):
    """Sparse files of 2-24 GB: read() calls are counted (/proc/self/io), and mmap-touching the
    data shows up as time (a full pass over a 24 GB hole takes far longer than the limit)."""
    big_lora = root / "big" / "kohya_sdxl_rank256.safetensors"
    big_lora.parent.mkdir()
    targets = factory.te_targets("clip_l", "lora_te1") | factory.unet_targets("sdxl", ldm=True)
    specs = {}
    for name, shape in targets.items():
        specs[f"{name}.lora_down.weight"] = ("F32", (256, *shape[1:]))
        specs[f"{name}.lora_up.weight"] = ("F32", (shape[0], 256, *([1, 1] if len(shape) == 4 else [])))
    factory.write_sparse_safetensors(big_lora, specs)
    files = [big_lora, built("ckpt-sdxl-sgm").path, built("ckpt-flux-dev").path]
    warm = [built("kohya-sd1").path, built("unet-only-sd1-prefixed").path]
    assert big_lora.stat().st_size > 1e9 and files[-1].stat().st_size > 2e10
    proc = subprocess.run([sys.executable, "-c", MEASURE, ",".join(map(str, files)), *map(str, warm)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for path, seen in report.items():
        assert seen["kind"] in ("lora", "checkpoint")
        assert seen["read"] < 1_000_000, f"{path}: read {seen['read']} bytes"
        assert seen["seconds"] < 3, f"{path}: {seen['seconds']:.1f} s"
