"""Issue 14 §1: no command loses or clobbers a file. Each writing command refuses an output that is one of its
inputs (even with --force) or that exists (without --force), and a missing output folder, before any work;
a folder output is never named like a file; each error names its input and never shows a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_helpers import run
from safetensors.torch import save_file

from adapterzoo.tiny_models import save_tiny_pipeline

TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # tiny SD1: 32×768


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_pipeline("sd1", tmp_path_factory.mktemp("tiny") / "tiny-sd1")


def lora(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    save_file({f"{TO_K}.lora_down.weight": torch.randn(2, 768, generator=gen),
               f"{TO_K}.lora_up.weight": torch.randn(32, 2, generator=gen),
               f"{TO_K}.alpha": torch.tensor(1.0)}, str(path))
    return path


def one_error_line(code: int, out: str, err: str) -> str:
    assert code == 1 and "Traceback" not in out + err, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_verify_never_writes_its_grid_over_an_input_or_an_existing_file(tiny, tmp_path, capsys, monkeypatch):
    sty = lora(tmp_path / "sty.safetensors")
    before = sty.read_bytes()
    for force in ([], ["--force"]):
        line = one_error_line(*run(["verify", str(sty), "--checkpoint", str(tiny), "-o", str(sty), *force],
                                   capsys, monkeypatch))
        assert "one of the inputs" in line and str(sty) in line
        assert sty.read_bytes() == before
    existing = tmp_path / "g.png"
    existing.write_bytes(b"mine")
    line = one_error_line(*run(["verify", str(sty), "--checkpoint", str(tiny), "-o", str(existing)],
                               capsys, monkeypatch))
    assert "already exists; pass --force" in line and existing.read_bytes() == b"mine"
    code, _, err = run(["verify", str(sty), "--checkpoint", str(tiny), "-o", str(existing), "--force",
                        "--size", "64x64", "--steps", "2", "--multiplier", "0", "--multiplier", "1"], capsys, monkeypatch)
    assert "Traceback" not in err and existing.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["no/such/folder/g.png", "g.jpg"])
def test_verify_checks_its_output_before_rendering(name, tiny, tmp_path, capsys, monkeypatch):
    import adapterzoo.verify.verifier as verifier

    def never(*args, **kwargs):
        raise AssertionError("rendered before the output was checked")

    monkeypatch.setattr(verifier.Verifier, "__init__", never)
    sty = lora(tmp_path / "sty.safetensors")
    line = one_error_line(*run(["verify", str(sty), "--checkpoint", str(tiny), "-o", str(tmp_path / name)],
                               capsys, monkeypatch))
    assert ("does not exist" in line) if "/" in name else ("name it *.png" in line)


def test_sample_refuses_a_jpg_name_and_an_input(tiny, tmp_path, capsys, monkeypatch):
    sty = lora(tmp_path / "sty.safetensors")
    before = sty.read_bytes()
    base = ["sample", "--checkpoint", str(tiny), "--lora", str(sty), "--prompt", "a cat", "--steps", "1",
            "--size", "64x64"]
    assert "name it *.png" in one_error_line(*run([*base, "-o", str(tmp_path / "y.jpg")], capsys, monkeypatch))
    assert not (tmp_path / "y.jpg").exists()
    line = one_error_line(*run([*base, "-o", str(sty), "--force"], capsys, monkeypatch))
    assert "one of the inputs" in line and sty.read_bytes() == before


def test_convert_to_a_folder_refuses_a_file_name(tiny, tmp_path, capsys, monkeypatch):
    single = tmp_path / "tiny.safetensors"
    code, _, err = run(["convert", str(tiny), "--to", "ldm", "-o", str(single)], capsys, monkeypatch)
    assert code == 0, err
    out = tmp_path / "x.safetensors"
    line = one_error_line(*run(["convert", str(single), "--to", "diffusers", "-o", str(out)], capsys, monkeypatch))
    assert "written as a folder; name it without .safetensors" in line and not out.exists()
    sty = lora(tmp_path / "sty.safetensors")
    line = one_error_line(*run(["convert", str(sty), "--to", "peft", "-o", str(tmp_path / "p.safetensors")],
                               capsys, monkeypatch))
    assert "written as a folder" in line


def test_merge_and_resize_refuse_a_missing_output_folder_first(tiny, tmp_path, capsys, monkeypatch):
    sty = lora(tmp_path / "sty.safetensors")
    out = tmp_path / "none" / "m.safetensors"
    line = one_error_line(*run(["merge", str(tiny), "--lora", str(sty), "-o", str(out)], capsys, monkeypatch))
    assert f"folder {out.parent} does not exist" in line
    line = one_error_line(*run(["resize", str(sty), "--rank", "1", "-o", str(out)], capsys, monkeypatch))
    assert f"folder {out.parent} does not exist" in line


def test_verify_batch_goes_on_past_a_broken_file(tiny, tmp_path, capsys, monkeypatch):
    good = lora(tmp_path / "good.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "notes.safetensors"
    text.write_text('{"hello": "world"}\n')
    out_dir = tmp_path / "sheet"
    code, out, err = run(["verify", str(broken), str(good), str(text), "--checkpoint", str(tiny),
                          "--out-dir", str(out_dir), "--size", "64x64", "--steps", "2", "--multiplier", "0",
                          "--multiplier", "1", "--json"], capsys, monkeypatch)
    assert code == 1 and "Traceback" not in err, err
    import json

    results = {Path(r["file"]).name: r for r in json.loads(out)}
    assert set(results) == {"broken.safetensors", "good.safetensors", "notes.safetensors"}
    assert results["broken.safetensors"]["verdict"] == "fail"
    assert results["broken.safetensors"]["reasons"][0].startswith("broken.safetensors: ")
    assert "not a safetensors file (it starts with '{\"': JSON text)" in results["notes.safetensors"]["reasons"][0]
    assert results["good.safetensors"]["coverage"] is not None
    assert (out_dir / "index.html").is_file()


@pytest.mark.parametrize("content, said", [
    (b'{"hello": "world"}\n', "not a safetensors file (it starts with '{\"': JSON text)"),
    (b"\x89PNG\r\n\x1a\n" + bytes(64), "not a safetensors file (it starts with a PNG signature: an image)"),
    (b"\xd9\x88\x00\x00\x00\x00\x00\x00{" + bytes(64), "header length 35033 runs past the end of the 73-byte file"),
])
def test_a_bad_lora_is_named_in_its_error(content, said, tiny, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(content)
    line = one_error_line(*run(["merge", str(tiny), "--lora", str(bad), "-o", str(tmp_path / "m")],
                               capsys, monkeypatch))
    assert f"trunc.safetensors: {said}" in line
    line = one_error_line(*run(["probe", str(bad)], capsys, monkeypatch))
    assert f"trunc.safetensors: {said}" in line


def test_a_text_file_named_ckpt_is_not_a_pickle(tmp_path, capsys, monkeypatch):
    text = tmp_path / "text.ckpt"
    text.write_text("no weights here\n")
    line = one_error_line(*run(["probe", str(text)], capsys, monkeypatch))
    assert line == "error: text.ckpt: not a torch pickle (it starts with 'no weights': text)"


def test_a_db_in_a_missing_folder_is_an_error_not_a_new_registry(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no" / "such" / "reg.db"
    line = one_error_line(*run(["--db", str(missing), "list"], capsys, monkeypatch))
    assert line == f"error: registry {missing}: folder {missing.parent} does not exist"
    assert not (tmp_path / "no").exists()


def test_sample_fails_when_keys_land_nowhere_unless_allowed(tiny, tmp_path, capsys, monkeypatch):
    path = lora(tmp_path / "partly.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    stray = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_nowhere"
    tensors.update({f"{stray}.lora_down.weight": torch.zeros(2, 768), f"{stray}.lora_up.weight": torch.zeros(32, 2),
                    f"{stray}.alpha": torch.tensor(1.0)})
    save_file(tensors, str(path))
    args = ["sample", "--checkpoint", str(tiny), "--lora", str(path), "--prompt", "a cat", "--steps", "1",
            "--size", "64x64", "-o", str(tmp_path / "s.png")]
    line = one_error_line(*run(args, capsys, monkeypatch))
    assert line.startswith("error: partly.safetensors: 3 of 6 key(s) land on no module of the checkpoint: ")
    assert line.endswith("(--allow-unmatched samples with the rest)") and not (tmp_path / "s.png").exists()
    code, out, err = run([*args, "--allow-unmatched"], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "s.png").is_file(), err


def test_lock_never_writes_over_the_registry_it_reads(tmp_path, capsys, monkeypatch):
    db = tmp_path / "reg.db"
    assert run(["--db", str(db), "list"], capsys, monkeypatch)[0] == 0
    before = _registry_state(db)
    line = one_error_line(*run(["--db", str(db), "lock", "-o", str(db), "--force"], capsys, monkeypatch))
    assert "one of the inputs" in line and _registry_state(db) == before


def _registry_state(db):
    """The file's identity and the database's content: WAL checkpoints rewrite the bytes of an unchanged registry
    whenever a pooled connection happens to close, so bytes would make this test flaky."""
    import sqlite3

    with sqlite3.connect(db) as connection:
        return db.stat().st_ino, list(connection.iterdump())


def test_third_party_chatter_never_reaches_stderr(tiny, tmp_path):
    """A fresh process, as a user runs it: transformers and diffusers log at import, which in-process tests miss."""
    import os
    import subprocess
    import sys

    sty = lora(tmp_path / "sty.safetensors")
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY", "PYTHONWARNINGS")}
    env.update(HF_HUB_OFFLINE="1", ADAPTERZOO_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-m", "adapterzoo", "merge", str(tiny), "--lora", str(sty), "-o",
                           str(tmp_path / "merged"), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_single_file_whose_text_encoder_does_not_fit_the_tokenizer_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """Issue 14: verify and sample on the demo's converted single file ended in IndexError in encode_prompt (its
    text encoder has 1,000 token rows; a single file carries no tokenizer, so CLIP's 49,408 come with it)."""
    single = tmp_path / "tiny-sd1.safetensors"
    assert run(["convert", str(tiny), "-o", str(single), "--to", "ldm"], capsys, monkeypatch)[0] == 0
    sty = lora(tmp_path / "sty.safetensors")
    said = "error: tiny-sd1.safetensors: its text_encoder has 1000 token rows but the tokenizer it is loaded with " \
           "has 49408 tokens: the parts do not fit"
    for args in (["verify", str(sty), "--checkpoint", str(single), "--steps", "1", "--size", "64x64"],
                 ["sample", "--checkpoint", str(single), "--lora", str(sty), "--prompt", "a cat", "--steps", "1",
                  "--size", "64x64", "-o", str(tmp_path / "s.png")]):
        assert one_error_line(*run(args, capsys, monkeypatch)).startswith(said), args


def test_pngs_carry_a1111s_own_hash_fields(tiny, tmp_path, capsys, monkeypatch):
    """Issue 14: A1111, Forge and Civitai's uploader know resources by `Model hash` and `Lora hashes` (AutoV2)."""
    import re
    from hashlib import sha256

    from PIL import Image

    sty = lora(tmp_path / "sty.safetensors")
    autov2 = sha256(sty.read_bytes()).hexdigest()[:10]
    grid, image = tmp_path / "grid.png", tmp_path / "image.png"
    assert run(["verify", str(sty), "--checkpoint", str(tiny), "--steps", "1", "--size", "64x64", "-o", str(grid)],
               capsys, monkeypatch)[0] in (0, 1)
    assert run(["sample", "--checkpoint", str(tiny), "--lora", str(sty), "--prompt", "a cat", "--steps", "1",
                "--size", "64x64", "-o", str(image), "--allow-unmatched"], capsys, monkeypatch)[0] == 0
    for png in (grid, image):
        text = Image.open(png).info["parameters"]
        assert f'Lora hashes: "sty: {autov2}"' in text, text
        assert re.search(r"Model hash: [0-9a-f]{10}, ", text), text
