"""A single-file checkpoint is verified from memory: the same results as the diffusers folder our converter
writes from it, and no temporary folder on the way (issue 15 §2)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from test_verify import SIZE, kohya_file, noise_prediction, relative, sha256
from transformers import CLIPTextConfig, CLIPTextModel

from adapterzoo import tiny_models
from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint
from adapterzoo.verify.pipeline_load import load_pipeline
from adapterzoo.verify.verifier import Verifier, VerifyOptions


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny SD1 single file (CLIP's real vocabulary, so the package's tokenizer fits), its folder and a LoRA."""
    tmp = tmp_path_factory.mktemp("single")
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    pipe.to(torch.float16).save_pretrained(tmp / "pipeline")
    single = tmp / "tiny.safetensors"
    convert_checkpoint(tmp / "pipeline", single, "ldm", dtype="fp16")
    convert_checkpoint(single, tmp / "converted", "diffusers")
    return single, tmp / "converted", kohya_file(pipe, "sd1", tmp / "kohya.safetensors")


def test_the_file_in_memory_predicts_as_the_folder_converted_from_it(checkpoint):
    single, folder, _ = checkpoint
    from_file = load_pipeline(single, torch.device("cpu"), torch.float32)
    from_folder = load_pipeline(folder, torch.device("cpu"), torch.float32)
    assert from_file.base == from_folder.base == "sd1"
    assert relative(noise_prediction(from_file.pipe), noise_prediction(from_folder.pipe)) < 1e-5
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(from_file.pipe, name).state_dict(), getattr(from_folder.pipe, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    assert from_file.pipe.tokenizer("a cat").input_ids == from_folder.pipe.tokenizer("a cat").input_ids


def test_verify_on_the_file_equals_verify_on_the_folder_and_writes_no_temporary_folder(
        checkpoint, tmp_path, monkeypatch):
    single, folder, lora = checkpoint
    watched = tmp_path / "tmp"
    watched.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched))
    made = []  # a temporary folder removed on the way out leaves no trace: watch every mkdir and open there
    for name in ("mkdir", "open"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda path, *a, real=real, **k: (
            made.append(path) if str(path).startswith(str(watched)) else None, real(path, *a, **k))[1])
    from_file = Verifier(single, VerifyOptions(steps=1, size=SIZE), sha256).verify(lora, None)
    monkeypatch.undo()
    assert tempfile.gettempdir() != str(watched) and made == [] and list(watched.iterdir()) == []
    from_folder = Verifier(folder, VerifyOptions(steps=1, size=SIZE), sha256).verify(lora, None)
    assert from_file["verdict"] == from_folder["verdict"] == "pass"
    assert from_file["coverage"] == from_folder["coverage"]
    for ours, theirs in zip(from_file["effects"], from_folder["effects"], strict=True):
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            if isinstance(value, float):
                assert value == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
            else:
                assert value == theirs[key], key
