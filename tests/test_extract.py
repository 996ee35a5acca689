"""`adapterzoo extract` through the real entry point: extract(base, merge(base, L)) gives back L's ΔW.

The checkpoints are tiny SD1 diffusers folders (real module names, small widths); the LoRA L and the
weight changes are written here key by key, and every ΔW is recomputed from the raw tensors with
plain torch (FORMATS.md §1.1), never through adapterzoo's readers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run
from deltas import kohya_deltas
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterzoo.cli import main
from adapterzoo.formats.checkpoint_targets import checkpoint_targets
from adapterzoo.formats.lora.lora_model import LoraModule
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.tiny_models import save_tiny_pipeline

BLOCK = "down_blocks.0.attentions.0"
# kohya name of an SD1 module (diffusers UNet paths; CLIP with `text_model.`) -> its weight key in the folder
L_TARGETS = {
    f"lora_unet_{BLOCK}.transformer_blocks.0.attn1.to_q": ("unet", f"{BLOCK}.transformer_blocks.0.attn1.to_q.weight"),
    f"lora_unet_{BLOCK}.transformer_blocks.0.attn2.to_k": ("unet", f"{BLOCK}.transformer_blocks.0.attn2.to_k.weight"),
    f"lora_unet_{BLOCK}.proj_in": ("unet", f"{BLOCK}.proj_in.weight"),
    "lora_unet_down_blocks.0.resnets.0.conv1": ("unet", "down_blocks.0.resnets.0.conv1.weight"),
    "lora_te_text_model.encoder.layers.0.self_attn.q_proj": ("text_encoder",
                                                             "encoder.layers.0.self_attn.q_proj.weight"),
}
WEIGHT_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}


def flat(name: str) -> str:
    return name.replace(".", "_")


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    return save_tiny_pipeline("sd1", tmp_path_factory.mktemp("base") / "tiny-sd1")


@pytest.fixture(scope="session")
def lora(base, tmp_path_factory) -> Path:
    """Rank 2, alpha 1, fp32, on a linear, a cross-attention, a 1x1 conv, a 3x3 conv and a CLIP layer."""
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for name, (component, key) in L_TARGETS.items():
        with safe_open(str(base / WEIGHT_FILES[component]), "pt") as f:
            shape = tuple(f.get_slice(key).get_shape())
        kernel = shape[2:]
        sd[f"{flat(name)}.lora_down.weight"] = torch.randn(2, shape[1], *kernel, generator=gen) * 0.3
        sd[f"{flat(name)}.lora_up.weight"] = torch.randn(shape[0], 2, *[1] * len(kernel), generator=gen) * 0.3
        sd[f"{flat(name)}.alpha"] = torch.tensor(1.0)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="session")
def merged(base, lora, tmp_path_factory) -> Path:
    """The merge helper's `adapterzoo merge`, through the same entry point."""
    out = tmp_path_factory.mktemp("merged") / "tiny-sd1-style"
    mp = pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["adapterzoo", "merge", str(base), "--lora", str(lora), "-o", str(out)])
    try:
        main()
    except SystemExit as exc:
        assert not exc.code, exc.code
    finally:
        mp.undo()
    return out


def test_extract_of_a_merge_gives_back_the_lora(base, lora, merged, tmp_path, capsys, monkeypatch):
    out = tmp_path / "extracted.safetensors"
    code, stdout, stderr = run(["extract", str(base), str(merged), "-o", str(out), "--rank", "2", "--json"],
                               capsys, monkeypatch)
    assert (code, stderr) == (0, "")
    report = json.loads(stdout)
    expected, extracted = kohya_deltas(load_file(lora)), kohya_deltas(load_file(out))
    assert set(extracted) == set(expected)  # every other weight was unchanged: skipped, not written
    for name, delta in expected.items():
        assert float(torch.linalg.norm(extracted[name] - delta)) <= 1e-4 * float(delta.norm()), name
    assert report["retained_fro"] == pytest.approx(1.0, abs=1e-5)
    assert all(row["rank"] == 2 for row in report["modules"]) and report["skipped_zero"] > 50
    targets = checkpoint_targets(base)
    loaded = load_lora(out, architecture=targets.architecture)
    assert len(loaded.modules) == len(L_TARGETS)
    assert all(isinstance(m, LoraModule) and m.rank == 2 and m.alpha == 2.0 for m in loaded.modules.values())


def test_extract_reads_a_single_file_checkpoint_against_a_folder(base, lora, merged, tmp_path, capsys, monkeypatch):
    single = tmp_path / "tiny-sd1-style.safetensors"
    code, _, stderr = run(["convert", str(merged), "-o", str(single), "--to", "ldm"], capsys, monkeypatch)
    assert code == 0, stderr
    out = tmp_path / "extracted.safetensors"
    code, stdout, stderr = run(["extract", str(base), str(single), "-o", str(out), "--rank", "2"], capsys, monkeypatch)
    assert code == 0, stderr
    assert "skipped" in stdout and f"wrote    {out}" in stdout
    expected, extracted = kohya_deltas(load_file(lora)), kohya_deltas(load_file(out))
    assert set(extracted) == set(expected)
    for name, delta in expected.items():
        assert float(torch.linalg.norm(extracted[name] - delta)) <= 1e-4 * float(delta.norm()), name


def test_provenance_names_both_checkpoints_by_role_and_hash(base, merged, tmp_path, capsys, monkeypatch):
    out = tmp_path / "extracted.safetensors"
    code, _, _ = run(["extract", str(base), str(merged), "-o", str(out), "--rank", "2"], capsys, monkeypatch)
    assert code == 0
    with safe_open(str(out), "pt") as f:
        operation = json.loads(f.metadata()["adapterzoo.operation"])
    assert operation["op"] == "extract" and operation["rule"] == {"rank": 2}
    assert [(i["name"], i["role"]) for i in operation["inputs"]] == [(base.name, "base"), (merged.name, "tuned")]
    for entry, folder in zip(operation["inputs"], (base, merged)):
        unet = "unet/diffusion_pytorch_model.safetensors"
        assert entry["sha256"][unet] == hashlib.sha256((folder / unet).read_bytes()).hexdigest()
        assert set(entry["sha256"]) == {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def changed(base, tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of `base` with full-rank changes (singular values 2^-i) on a UNet and a CLIP weight, plus a
    changed norm weight and bias (a LoRA cannot carry those)."""
    tuned = Path(shutil.copytree(base, tmp_path / "tuned"))
    gen = torch.Generator().manual_seed(5)
    changes = {}
    for component, key in (("unet", f"{BLOCK}.transformer_blocks.0.attn2.to_k.weight"),
                           ("text_encoder", "encoder.layers.0.self_attn.q_proj.weight")):
        sd = load_file(tuned / WEIGHT_FILES[component])
        out, inner = sd[key].shape
        q_out = torch.linalg.qr(torch.randn(out, out, generator=gen)).Q
        q_in = torch.linalg.qr(torch.randn(inner, out, generator=gen)).Q
        changes[key] = (q_out * 0.5 ** torch.arange(out, dtype=torch.float32)) @ q_in.T
        sd[key] = sd[key] + changes[key]
        if component == "unet":
            sd[f"{BLOCK}.norm.weight"] = sd[f"{BLOCK}.norm.weight"] + 0.1
            sd[f"{BLOCK}.proj_in.bias"] = sd[f"{BLOCK}.proj_in.bias"] + 0.1
        save_file(sd, str(tuned / WEIGHT_FILES[component]))
    return tuned, changes


def test_a_full_rank_change_is_truncated_optimally_and_what_no_lora_carries_is_named(
        base, changed, tmp_path, capsys, monkeypatch):
    tuned, changes = changed
    out = tmp_path / "extracted.safetensors"
    code, stdout, _ = run(["extract", str(base), str(tuned), "-o", str(out), "--rank", "3", "--json"],
                          capsys, monkeypatch)
    assert code == 0
    report = json.loads(stdout)
    extracted = kohya_deltas(load_file(out))
    names = {f"lora_unet_{flat(BLOCK)}_transformer_blocks_0_attn2_to_k":
             f"{BLOCK}.transformer_blocks.0.attn2.to_k.weight",
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj.weight"}
    assert set(extracted) == set(names)
    for name, key in names.items():
        s = torch.linalg.svdvals(changes[key].double())
        error = float(torch.linalg.norm(changes[key].double() - extracted[name]))
        # exact SVD on the 32 x 768 weight; the 768 x 768 one goes through the seeded randomized SVD
        assert error == pytest.approx(float(s[3:].norm()), rel=1e-3), name
    assert report["left_out"] == [f"unet.{BLOCK}.norm", f"unet.{BLOCK}.proj_in.bias"]
    assert report["warnings"] and 0 < report["retained_fro"] < 1


def test_checkpoints_of_different_models_are_refused_saying_which_is_which(base, tmp_path, capsys, monkeypatch):
    other = save_tiny_pipeline("sd2", tmp_path / "tiny-sd2")
    out = tmp_path / "x.safetensors"
    code, _, stderr = run(["extract", str(base), str(other), "-o", str(out), "--rank", "2"], capsys, monkeypatch)
    assert code == 1 and not out.exists()
    assert f"{base.name} (BASE) is sd1" in stderr and f"{other.name} (TUNED) is sd2" in stderr


def test_identical_checkpoints_give_nothing_to_extract(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.safetensors"
    code, _, stderr = run(["extract", str(base), str(base), "-o", str(out), "--rank", "2"], capsys, monkeypatch)
    assert code == 1 and "nothing to extract" in stderr and not out.exists()
