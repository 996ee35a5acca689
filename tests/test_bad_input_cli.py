"""Bad input through the real entry point: every command ends in a result or one `error:` line, never a
traceback, and the lines for LoRAs made for another model or spelled in an unknown dialect say so.

The model is a tiny SD1 diffusers folder (real module names, small widths), so a LoRA made for it has
names the built-in SD1 table knows and shapes it does not: a LoRA for a resized model.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import struct
from pathlib import Path

import factory
import pytest
import torch
from cli_helpers import run
from mutations import mutate, read_seed, trimmed, write
from safetensors.torch import save_file

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.safetensors_header import read_header
from adapterzoo.tiny_models import save_tiny_pipeline

REAL = Path(__file__).parent / "fixtures" / "real"
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # tiny SD1: 32×768; SD1: 320×768
KOHYA_TO_K = "lora_unet_" + TO_K.replace(".", "_")
CASES_PER_SEED = 3  # through every command that reads that kind of file: ~60 runs
RANDOM_SEED = 8_4_2026


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_pipeline("sd1", tmp_path_factory.mktemp("tiny") / "tiny-sd1")


def kohya_lora(path: Path, out_features: int, rank: int = 2) -> Path:
    """A rank-2 kohya LoRA on the cross-attention to_k, whose output width makes it fit one model or another."""
    gen = torch.Generator().manual_seed(0)
    save_file({f"{KOHYA_TO_K}.lora_down.weight": torch.randn(rank, 768, generator=gen),
               f"{KOHYA_TO_K}.lora_up.weight": torch.randn(out_features, rank, generator=gen),
               f"{KOHYA_TO_K}.alpha": torch.tensor(1.0)}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory) -> Path:
    return kohya_lora(tmp_path_factory.mktemp("lora") / "for-tiny.safetensors", 32)


def one_error_line(code: int, out: str, err: str) -> str:
    assert code == 1 and "Traceback" not in out + err, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- names matched, shapes did not ------------------------------------------------------------------


def test_convert_says_names_matched_but_shapes_did_not_and_checkpoint_reads_it(tiny, tiny_lora, tmp_path, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "out.safetensors"
    line = one_error_line(*run(["convert", str(tiny_lora), "--to", "diffusers", "-o", str(out)], capsys, monkeypatch))
    assert line == (f"error: 3 key(s) name modules of the sd1 model but not their shapes (e.g. {KOHYA_TO_K}: "
                    "file 32×768, sd1 320×768): a LoRA for a resized, pruned or other model? "
                    "Pass that model with --checkpoint")
    assert not out.exists()
    code, _, err = run(["convert", str(tiny_lora), "--to", "diffusers", "--checkpoint", str(tiny), "-o", str(out)],
                       capsys, monkeypatch)
    assert code == 0 and out.is_file(), err  # the hint is the fix


def test_merge_loras_says_names_matched_but_shapes_did_not(tiny_lora, tmp_path, capsys, monkeypatch):
    other = kohya_lora(tmp_path / "other.safetensors", 32, rank=3)
    line = one_error_line(*run(["merge-loras", str(tiny_lora), str(other), "-o", str(tmp_path / "m.safetensors")],
                               capsys, monkeypatch))
    assert line == (f"error: 3 key(s) name modules of the sd1 model but not their shapes (e.g. {KOHYA_TO_K}: "
                    "file 32×768, sd1 320×768): a LoRA for a resized, pruned or other model? "
                    "Pass that model with --checkpoint")


def test_merge_says_names_matched_but_shapes_did_not(tiny, tmp_path, capsys, monkeypatch):
    wide = kohya_lora(tmp_path / "for-sd1.safetensors", 320)  # made for the real SD1, merged into the tiny one
    line = one_error_line(*run(["merge", str(tiny), "--lora", str(wide), "-o", str(tmp_path / "merged")],
                               capsys, monkeypatch))
    keys = ", ".join(f"{KOHYA_TO_K}.{part}" for part in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert line == (f"error: for-sd1.safetensors: 3 key(s) land on no weight of tiny-sd1: {keys}; 3 of them name "
                    f"weights of it but not their shapes (e.g. {KOHYA_TO_K}: file 320×768, tiny-sd1 32×768): "
                    "a LoRA for another model? (--allow-unmatched merges the rest)")
    assert not (tmp_path / "merged").exists()


# -- files we cannot read, said as such -------------------------------------------------------------


@pytest.fixture
def lora_like(tmp_path) -> Path:
    """LoRA factors under diffusers module paths with kohya part names: no dialect spells keys this way."""
    save_file({f"unet.{TO_K}.lora_down.weight": torch.zeros(2, 768),
               f"unet.{TO_K}.lora_up.weight": torch.zeros(320, 2)}, str(tmp_path / "odd.safetensors"))
    return tmp_path / "odd.safetensors"


def test_probe_warns_that_lora_like_keys_match_no_dialect(lora_like, capsys, monkeypatch):
    code, out, _ = run(["probe", str(lora_like)], capsys, monkeypatch)
    assert code == 0
    assert "kind     unknown" in out.splitlines()
    assert (f"warning  looks like a LoRA, but its key names match no dialect we read: first key "
            f"unet.{TO_K}.lora_down.weight") in out.splitlines()


def test_convert_of_lora_like_keys_says_why(lora_like, tmp_path, capsys, monkeypatch):
    line = one_error_line(*run(["convert", str(lora_like), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")],
                               capsys, monkeypatch))
    assert line == (f"error: cannot convert an unknown file: looks like a LoRA, but its key names match no dialect "
                    f"we read: first key unet.{TO_K}.lora_down.weight")


def test_convert_of_an_unknown_file_reads_right(tmp_path, capsys, monkeypatch):
    path = factory.build("unknown-safetensors", tmp_path).path
    code, out, err = run(["probe", str(path)], capsys, monkeypatch)
    assert "warning  no known key family: not a checkpoint, adapter or embedding we recognise" in out.splitlines()
    line = one_error_line(*run(["convert", str(path), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")],
                               capsys, monkeypatch))
    assert line == "error: cannot convert an unknown file (convertible: lora, lycoris, checkpoint, embedding, hypernetwork)"


def test_metadata_that_is_a_list_is_refused_in_one_line(tiny_lora, tmp_path, capsys, monkeypatch):
    """Issue 8's example: `__metadata__: []` passed our check and safe_open raised SafetensorError."""
    with open(tiny_lora, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header, data = json.loads(fh.read(n)), fh.read()
    header["__metadata__"] = []
    raw = json.dumps(header).encode()
    path = tmp_path / "list-metadata.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    for args in (["probe", str(path)], ["convert", str(path), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")]):
        assert one_error_line(*run(args, capsys, monkeypatch)) == \
            "error: list-metadata.safetensors: __metadata__ must map strings to strings"


# -- a sample of mutated files through every command --------------------------------------------------


def commands(kind: str, bad: Path, out: Path, tiny: Path, tiny_lora: Path) -> list[list]:
    if kind == "checkpoint":  # the tiny folder with its UNet weights replaced by the mutated file
        folder = Path(shutil.copytree(tiny, out / "tiny-sd1"))
        shutil.copy(bad, folder / "unet" / "diffusion_pytorch_model.safetensors")
        return [["probe", folder], ["scan", folder], ["convert", folder, "--to", "ldm", "-o", out / "c.safetensors"],
                ["merge", folder, "--lora", tiny_lora, "-o", out / "merged"],
                ["extract", folder, tiny, "--rank", "2", "-o", out / "e.safetensors"]]
    return [["probe", bad], ["scan", out],
            ["convert", bad, "--to", "kohya", "--rank", "1", "-o", out / "k.safetensors"],
            ["convert", bad, "--to", "diffusers", "--checkpoint", tiny, "-o", out / "d.safetensors"],
            ["resize", bad, "--rank", "1", "-o", out / "r.safetensors"],
            ["merge", tiny, "--lora", bad, "--allow-unmatched", "-o", out / "merged"],
            ["merge-loras", bad, tiny_lora, "-o", out / "m.safetensors"]]


def test_mutated_files_end_in_one_line_through_every_command(tiny, tiny_lora, tmp_path, capsys, monkeypatch):
    """Per seed, cases whose header is valid (they reach the readers and the math) and one whose is not."""
    seeds = {"lora": [read_seed(tiny_lora), trimmed(read_seed(REAL / "lora_disney.safetensors"), 40),
                      trimmed(read_seed(factory.build("lycoris-lokr", tmp_path).path))],
             "checkpoint": [read_seed(tiny / "unet" / "diffusion_pytorch_model.safetensors")]}
    rng = random.Random(RANDOM_SEED)
    runs, escaped, made = 0, [], itertools.count()
    for kind, kind_seeds in seeds.items():
        for seed in kind_seeds:
            wanted = {True: CASES_PER_SEED - 1, False: 1}  # valid header: how many more of each
            while any(wanted.values()):
                how, head, data = mutate(seed, rng)
                case = tmp_path / f"case{next(made)}"
                case.mkdir()
                write(case / "bad.safetensors", head, data)
                try:
                    valid = bool(read_header(case / "bad.safetensors"))
                except BadFileError:
                    valid = False
                if not wanted[valid]:
                    shutil.rmtree(case)
                    continue
                wanted[valid] -= 1
                for args in commands(kind, case / "bad.safetensors", case, tiny, tiny_lora):
                    runs += 1
                    try:
                        code, out, err = run([str(a) for a in args], capsys, monkeypatch)
                    except Exception as exc:  # noqa: BLE001 -- what reaches a user as a traceback
                        escaped.append(f"{args[0]} on {seed.name} ({how}): {type(exc).__name__}: {exc}")
                        continue
                    if code != 0:
                        assert "Traceback" not in out + err and err.strip().count("\n") == 0, (args, how, err)
                        assert code == 1 and err.startswith("error: "), (args, how, code, err)
    assert not escaped, f"{len(escaped)} of {runs} runs ended in a traceback:\n" + "\n".join(escaped)
