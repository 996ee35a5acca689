"""GGUF checkpoints (city96's quantised ComfyUI transformers): probe reads names, shapes and quantisation types from
the header with our own reader, which agrees with llama.cpp's (the `gguf` package writes the files and its reader
is the reference); scan indexes them; merge and convert refuse them in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize
from safetensors.torch import save_file

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.gguf_header import ORIG_SHAPE, read_gguf_header
from adapterzoo.formats.probe import probe

W = 32  # a tiny SD3.5-Medium-shaped MMDiT: q/k norms, attn2 in block 0; rows a multiple of Q8_0's block of 32


def sd35_tensors() -> dict[str, tuple[int, ...]]:
    """SAI single-file names of a two-block MMDiT (what city96's SD3.5 GGUFs hold)."""
    shapes = {"x_embedder.proj.weight": (W, 16, 2, 2), "pos_embed": (1, 64, W), "context_embedder.weight": (W, 64),
              "final_layer.linear.weight": (64, W), "final_layer.adaLN_modulation.1.weight": (2 * W, W),
              "y_embedder.mlp.0.weight": (W, 64), "t_embedder.mlp.0.weight": (W, 256)}
    for i in range(2):
        for stream in ("x_block", "context_block"):
            p = f"joint_blocks.{i}.{stream}"
            shapes[f"{p}.attn.qkv.weight"] = (3 * W, W)
            shapes[f"{p}.attn.ln_q.weight"] = (16,)
            shapes[f"{p}.adaLN_modulation.1.weight"] = (6 * W, W)
        shapes["joint_blocks.0.x_block.attn2.qkv.weight"] = (3 * W, W)
    return shapes


def write_gguf(path: Path, shapes: dict[str, tuple[int, ...]], quant: GGMLQuantizationType = GGMLQuantizationType.Q8_0,
               arch: str = "sd3", truncate: int = 0) -> Path:
    """2-D weights quantised, the rest F32; a 4-D conv stored flattened to 2-D with ComfyUI-GGUF's orig_shape key."""
    writer = GGUFWriter(path, arch)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        data = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 4:
            writer.add_array(ORIG_SHAPE + name, list(shape))
            data = data.reshape(shape[0], -1)
        if data.ndim == 2 and data.shape[-1] % 32 == 0:
            writer.add_tensor(name, quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - truncate)
    return path


def test_our_header_reader_agrees_with_llama_cpp_s(tmp_path):
    path = write_gguf(tmp_path / "sd35-Q8_0.gguf", sd35_tensors())
    ours = read_gguf_header(path)
    theirs = GGUFReader(path)
    assert ours.metadata["general.architecture"] == "sd3"
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for tensor in theirs.tensors:
        mine = ours.tensors[tensor.name]
        assert mine.quant == tensor.tensor_type.name and mine.nbytes == tensor.n_bytes
        assert ours.data_offset + mine.offset == tensor.data_offset
        if ORIG_SHAPE + tensor.name not in ours.metadata:
            assert mine.shape == tuple(int(d) for d in reversed(tensor.shape))
    assert ours.tensors["x_embedder.proj.weight"].shape == (W, 16, 2, 2)  # ComfyUI-GGUF's orig_shape, not 2-D


def test_probe_names_base_variant_and_quantisation_from_the_header(tmp_path):
    found = probe(write_gguf(tmp_path / "sd3.5_medium-Q8_0.gguf", sd35_tensors()))
    assert (found.kind, found.base, found.format, found.dtype) == ("checkpoint", "sd35", "gguf", "Q8_0")
    assert found.details["variant"] == "medium" and found.details["layout"] == "ldm"
    assert found.details["gguf_architecture"] == "sd3"
    assert found.details["quantization"] == {"F32": 5, "Q8_0": 15}  # norms and pos_embed stay F32


def test_a_gguf_no_family_knows_says_what_its_header_calls_it(tmp_path):
    found = probe(write_gguf(tmp_path / "t5.gguf", {"blk.0.attn_q.weight": (64, 64)}, arch="t5encoder"))
    assert found.base == "unknown" and any("'t5encoder'" in w for w in found.warnings)


def test_broken_gguf_files_are_one_line(tmp_path, capsys, monkeypatch):
    from cli_helpers import run

    truncated = write_gguf(tmp_path / "cut.gguf", sd35_tensors(), truncate=100)
    with pytest.raises(BadFileError, match="past the end"):
        read_gguf_header(truncated)
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    for name in ("cut.gguf", "junk.gguf"):
        code, _, err = run(["probe", str(tmp_path / name)], capsys, monkeypatch)
        assert code == 1 and len(err.strip().splitlines()) == 1, err


def test_merge_and_convert_refuse_a_quantised_gguf(tmp_path, capsys, monkeypatch):
    from cli_helpers import run

    model = write_gguf(tmp_path / "sd35.gguf", sd35_tensors())
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, W),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(3 * W, 2)},
              str(tmp_path / "lora.safetensors"))
    for args in (["merge", str(model), "--lora", str(tmp_path / "lora.safetensors"), "-o", str(tmp_path / "m.safetensors")],
                 ["convert", str(model), "-o", str(tmp_path / "c.safetensors"), "--to", "ldm"]):
        code, _, err = run(args, capsys, monkeypatch)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        assert "quantised GGUF" in err and "unquantised file" in err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def test_scan_indexes_gguf_files_and_probing_them_imports_no_torch(tmp_path):
    folder = tmp_path / "models" / "unet"
    folder.mkdir(parents=True)
    write_gguf(folder / "sd3.5_medium-Q8_0.gguf", sd35_tensors())
    env = {**os.environ, "ADAPTERZOO_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-X", "importtime", "-m", "adapterzoo"]
    done = subprocess.run([*command, "scan", str(tmp_path / "models")], capture_output=True, text=True, timeout=300,
                          env=env, check=False)
    assert done.returncode == 0, done.stderr[-500:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert "torch" not in imported and "adapterzoo" in imported
    listed = subprocess.run([sys.executable, "-m", "adapterzoo", "list", "--base", "sd35", "--json"],
                            capture_output=True, text=True, timeout=300, env=env, check=True)
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["kind"], r["format"], r["dtype"]) for r in rows] == [
        ("sd3.5_medium-Q8_0.gguf", "checkpoint", "gguf", "Q8_0")]
