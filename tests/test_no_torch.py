"""Commands that touch no tensor import neither torch, diffusers nor transformers (issue 19 §2), checked on
`python -X importtime` of the real command line; and a header read never maps the file, so a checkpoint
larger than the process may address is probed all the same."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import factory
import pytest
from fake_civitai import FakeCivitai

HEAVY = ("torch", "diffusers", "transformers")


def run_importtime(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The command as a user runs it, and every top-level package it imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "adapterzoo", *args],
                          capture_output=True, text=True, timeout=300, check=False)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done, imported


@pytest.fixture
def library(tmp_path: Path, fake_civitai: FakeCivitai) -> dict:
    folder = tmp_path / "models" / "Lora"
    folder.mkdir(parents=True)
    case = factory.build("kohya-sd1", folder)
    lora = case.path
    checkpoint = factory.write_sparse_safetensors(tmp_path / "sd1.safetensors", factory.sd_checkpoint_specs("sd1"))
    version = fake_civitai.add_model("Tiny Knight", [lora], trained_words=["kn1ght"]).versions[0].id
    return {"lora": lora, "case": case, "checkpoint": checkpoint, "folder": tmp_path / "models", "version": version}


def test_header_commands_import_no_torch(library, tmp_path):
    lora = str(library["lora"])
    commands = [
        ["--help"],
        ["probe", lora, "--json"],
        ["probe", str(library["checkpoint"]), "--json"],
        ["pull", f"civitai:{library['version']}", "--dest", str(tmp_path / "pulled")],  # before scan knows it
        ["scan", str(library["folder"])],
        ["list", "--json"],
        ["show", lora],
        ["search", "knight", "--source", "civitai"],
        ["enrich", "--all"],
        ["lock", "-o", str(tmp_path / "zoo.lock.json")],
    ]
    for args in commands:
        done, imported = run_importtime(*args)
        assert done.returncode == 0, f"{args}: {done.stderr[-500:]}"
        assert not imported & set(HEAVY), f"adapterzoo {' '.join(args[:1])} imported {sorted(imported & set(HEAVY))}"
        assert "adapterzoo" in imported  # the importtime lines were read
    expect = library["case"].expect  # the alphas, read as bytes, as torch read them before
    probed = json.loads(run_importtime("probe", lora, "--json")[0].stdout)
    assert {key: probed[key] for key in expect} == expect
    assert (tmp_path / "pulled" / library["lora"].name).is_file()


def test_help_and_probe_leave_the_registry_unimported(library):
    """The start-up budget of --help and probe (0.2 s and 0.25 s, issue 19) has no room for SQLAlchemy's 0.2 s:
    only the commands that open the registry import it."""
    for args in (["--help"], ["probe", str(library["lora"]), "--json"]):
        done, imported = run_importtime(*args)
        assert done.returncode == 0 and "sqlalchemy" not in imported, f"adapterzoo {args[0]} imported sqlalchemy"


def test_reading_a_pickle_still_imports_torch(tmp_path):
    """The rule is about header-only work: a pickle is unpickled by torch's safe loader, lazily."""
    import torch

    torch.save({"emb_params": torch.zeros(2, 768)}, tmp_path / "embedding.pt")
    done, imported = run_importtime("probe", str(tmp_path / "embedding.pt"))
    assert done.returncode == 0 and "torch" in imported and "diffusers" not in imported


def _limit_address_space() -> None:
    limit = 2 << 30  # far less than the file: a mapping of it could not be made
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def test_a_checkpoint_larger_than_the_address_space_is_probed_from_its_header(tmp_path):
    """A 64 GiB LoRA-bearing file (sparse: no disk used) under a 2 GiB address-space limit: safetensors'
    safe_open would fail to map it; probe reads the header and the alphas with plain file I/O."""
    specs = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{part}": ("F32", shape) for part, shape in
             (("lora_down.weight", (4, 320)), ("lora_up.weight", (320, 4)), ("alpha", ()))}
    specs["filler"] = ("F16", (32, 1 << 30))  # 64 GiB of zeros, as a hole
    path = factory.write_sparse_safetensors(tmp_path / "huge.safetensors", specs)
    assert path.stat().st_size > 64 << 30
    done = subprocess.run([sys.executable, "-m", "adapterzoo", "probe", str(path), "--json"], capture_output=True,
                          text=True, timeout=300, preexec_fn=_limit_address_space, check=False)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert (found["kind"], found["format"], found["rank"], found["alpha"]) == ("lora", "kohya", 4, 0.0)


def test_numbers_read_as_bytes_equal_what_torch_reads(tmp_path):
    """Every 0-d dtype a LoRA's alpha may come in, all 256 patterns of both 8-bit floats included."""
    import math

    import torch
    from safetensors.torch import load_file, save_file

    from adapterzoo.formats.io.safetensors_header import read_header
    from adapterzoo.formats.io.safetensors_values import read_number

    tensors = {f"{dtype}": torch.tensor(-2.75).to(dtype) for dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
        torch.int64, torch.uint8, torch.bool)}
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensors.update({f"{dtype}.{byte}": torch.tensor(byte, dtype=torch.uint8).view(dtype) for byte in range(256)})
    save_file(tensors, str(tmp_path / "numbers.safetensors"))
    header = read_header(tmp_path / "numbers.safetensors")
    for key, tensor in load_file(str(tmp_path / "numbers.safetensors")).items():
        expected, got = float(tensor.float()), read_number(tmp_path / "numbers.safetensors", header, key)
        assert got == expected or (math.isnan(got) and math.isnan(expected)), key
