"""Z-Image in verify and sample: a tiny ZImagePipeline (Qwen3 text encoder, byte-level tokenizer written by the test)
loaded as a full folder, a transformer folder or ComfyUI's single file (in memory, no temporary folder) with the
other parts from --pipeline; every LoRA dialect probe reads for Z-Image; the render against diffusers'
ZImagePipeline for Turbo (no CFG) and Base (CFG), the run-time LoRA against diffusers' own Z-Image LoRA loader."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from dit_verify import assert_passes_fully, assert_run_time_equals, block_linears, cli, diffusers_lora, watched_tempdir
from PIL import Image
from transformers import Qwen3Model
from zimage_tiny import CAP, CLASSES, save_comfy_file, save_qwen3_file, save_tiny_zimage

from adapterzoo.formats.probe import probe
from adapterzoo.verify import denoise
from adapterzoo.verify.pipeline_load import load_for_sampling
from adapterzoo.verify.verifier import default_steps, guidance_parameters

SIZE = ["--size", "32x32", "--steps", "2"]
PROMPT = "a photo of a cat"
BLOCKS = ("layers.", "noise_refiner.", "context_refiner.")
RECIPE = "Sampler: FlowMatchEulerDiscreteScheduler, Guidance: none, Shift: 3.0,"  # Turbo's, in the PNG


@pytest.fixture(scope="module")
def zimage(tmp_path_factory) -> dict[str, Path]:
    """Turbo and Base pipeline folders (told apart by their paths, as the real ones are), a folder of every part
    but the transformer, a transformer-only folder and ComfyUI's single file of the same transformer."""
    root = tmp_path_factory.mktemp("zimage")
    turbo = save_tiny_zimage(root / "Z-Image-Turbo")
    transformer = ZImageTransformer2DModel.from_pretrained(turbo / "transformer")
    encoder = Qwen3Model.from_pretrained(turbo / "text_encoder")
    return {"pipe": turbo, "base": save_tiny_zimage(root / "Z-Image-Base"),
            "qwen3": save_qwen3_file(root / "qwen_3_tiny.safetensors", encoder),
            "tokenizer": save_tiny_zimage(root / "tokenizer_only", ("tokenizer",)),
            "parts": save_tiny_zimage(root / "parts", tuple(n for n in CLASSES if n != "transformer")),
            "transformer_only": save_tiny_zimage(root / "transformer_only", ("transformer",)) / "transformer",
            "comfy": save_comfy_file(root / "z_image_turbo_tiny.safetensors", transformer)}


def transformer_linears(folder: Path) -> dict[str, tuple[int, int]]:
    """Every Linear of the tiny transformer's blocks, by its `transformer.` path -> (in, out)."""
    return block_linears(ZImageTransformer2DModel.from_pretrained(folder / "transformer"), BLOCKS, "transformer.")


@pytest.fixture(scope="module")
def dialects(zimage, tmp_path_factory) -> dict[str, Path]:
    """One file in each dialect probe reads for Z-Image: diffusers, and by our converter musubi's kohya names,
    ComfyUI's (q, k, v fused into attention.qkv) and PEFT."""
    from adapterzoo.formats.convert import convert

    root = tmp_path_factory.mktemp("loras")
    files = {"diffusers": diffusers_lora(root / "diffusers.safetensors", transformer_linears(zimage["pipe"]))}
    for to, name in (("kohya", "musubi.safetensors"), ("comfy", "comfy.safetensors"), ("peft", "peft")):
        convert(files["diffusers"], root / name, to, checkpoint=zimage["pipe"])
        files[to] = root / name
    return files


def test_every_dialect_passes_on_the_full_pipeline_and_zero_is_the_bare_model(zimage, dialects, capsys, monkeypatch):
    for dialect, path in dialects.items():
        assert probe(path).format == dialect, dialect
        result = cli(["verify", str(path), "--checkpoint", str(zimage["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
        assert_passes_fully(result, dialect)
    parameters = result["parameters"]
    assert (parameters["sampler"], parameters["guidance"], parameters["shift"], parameters["steps"]) == (
        "FlowMatchEulerDiscreteScheduler", "none", 3.0, 2)
    assert "cfg_scale" not in parameters and "negative_prompt" not in parameters


def test_a_zero_up_lora_fails_no_effect(zimage, tmp_path, capsys, monkeypatch):
    path = diffusers_lora(tmp_path / "zero.safetensors", transformer_linears(zimage["pipe"]), zero_up=True)
    result = cli(["verify", str(path), "--checkpoint", str(zimage["pipe"]), *SIZE, "--json"], capsys, monkeypatch,
                 code=1)
    assert (result["verdict"], result["reasons"]) == ("fail", ["no effect: every lora_up is zero"])


@pytest.mark.parametrize("loaded_from, base", [
    ("/hub/models--Tongyi-MAI--Z-Image/snapshots/0123abcd/transformer", True),
    ("/hub/models--Tongyi-MAI--Z-Image-Turbo/snapshots/0123abcd/transformer", False),
    ("/models/diffusion_models/zimage_base_bf16.safetensors", True),
    ("/models/diffusion_models/z_image_turbo_bf16.safetensors", False),
    ("/models/my-finetune.safetensors", False)])  # unsaid: Turbo, what most checkpoints are
def test_base_is_told_by_where_the_model_was_loaded_from(loaded_from, base):
    from types import SimpleNamespace

    from adapterzoo.formats.families.zimage.sampling import is_base

    assert is_base(SimpleNamespace(config={"_name_or_path": loaded_from})) is base


@pytest.mark.parametrize("variant, steps, guidance, scale", [
    ("pipe", 9, {"guidance": "none"}, 0.0),
    ("base", 50, {"negative_prompt": "", "cfg_scale": 5.0}, 4.0)])  # the Base model card's guidance_scale 4
def test_the_loop_renders_what_z_image_pipeline_renders(zimage, variant, steps, guidance, scale):
    """Qwen3's chat-wrapped prompt states, the reversed timestep and negated output, the sigmas and shift, and
    for Base CFG at the recorded scale (ZImagePipeline's guidance_scale is one less): the latents of
    ZImagePipeline from the same noise. Turbo renders 9 steps without CFG, Base 50 with it, as recorded."""
    pipe = load_for_sampling(zimage[variant], "cpu", "fp32").pipe
    assert (default_steps(pipe), guidance_parameters(pipe)) == (steps, guidance)
    noise = denoise.seeded_noise(pipe, (32, 32), 0)
    predict = denoise.guided(pipe.unet, denoise.encode_prompt(pipe, PROMPT), denoise.encode_prompt(pipe, ""))
    ours = denoise.denoise(pipe, noise, 2, predict)
    reference = ZImagePipeline.from_pretrained(zimage[variant], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, num_inference_steps=2, guidance_scale=scale, height=32, width=32,
                       latents=noise.clone(), output_type="latent").images
    assert (ours - noise).abs().max() > 0.1
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_run_time_equals_diffusers_load_lora_into_transformer(zimage, dialects):
    """diffusers reads the diffusers file and musubi's names itself: each is the reference for its own file; the
    ComfyUI (fused qkv) and PEFT files, which diffusers' Z-Image loader does not read, against the diffusers file
    they were converted from."""
    loaded = load_for_sampling(zimage["pipe"], "cpu", "fp32")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    cond = denoise.Conditioning(torch.randn(1, 12, CAP, generator=gen), {"mask": torch.ones(1, 12, dtype=torch.bool)})
    cond.added["mask"][0, 9:] = False  # padding the transformer never sees
    for dialect, source in (("diffusers", "diffusers"), ("kohya", "kohya"), ("comfy", "diffusers"),
                            ("peft", "diffusers")):
        reference = copy.deepcopy(loaded.pipe.transformer)
        ZImagePipeline.load_lora_into_transformer(ZImagePipeline.lora_state_dict(str(dialects[source])),
                                                  transformer=reference)
        assert_run_time_equals(loaded, dialects[dialect], reference, x, cond)


def test_a_comfy_file_loads_in_memory_with_the_pipelines_parts(zimage, dialects, tmp_path, capsys, monkeypatch):
    watched = watched_tempdir(tmp_path, monkeypatch)
    lora = str(dialects["comfy"])
    message = cli(["verify", lora, "--checkpoint", str(zimage["comfy"]), *SIZE, "--json"], capsys, monkeypatch,
                  code=1)["error"]
    assert "\n" not in message and "no vae (AutoencoderKL), text_encoder (Qwen3Model) for a Z-Image" in message
    assert "--pipeline" in message
    grid = tmp_path / "grid.png"
    from_file = cli(["verify", lora, "--checkpoint", str(zimage["comfy"]), "--pipeline", str(zimage["parts"]), *SIZE,
                     "-o", str(grid), "--json"], capsys, monkeypatch)
    from_folder = cli(["verify", lora, "--checkpoint", str(zimage["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert from_file["verdict"] == "pass" and from_file["base"] == "zimage"
    for a, b in zip(from_file["effects"], from_folder["effects"], strict=True):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-6)
        assert a["mean_abs_pixel_change"] == pytest.approx(b["mean_abs_pixel_change"], rel=1e-4, abs=1e-3)
    assert list(watched.iterdir()) == []
    assert RECIPE in Image.open(grid).text["parameters"]


def test_a_transformer_folder_takes_the_rest_from_pipeline(zimage, dialects, capsys, monkeypatch):
    args = ["verify", str(dialects["kohya"]), "--checkpoint", str(zimage["transformer_only"]), "--pipeline",
            str(zimage["parts"]), *SIZE, "--json"]
    result = cli(args, capsys, monkeypatch)
    assert (result["verdict"], result["base"]) == ("pass", "zimage")
    quick = cli([*args, "--quick"], capsys, monkeypatch)
    assert quick["verdict"] == "pass" and quick["quick"] and quick["grid"] is None
    assert [e["noise_pred_rel_change"] for e in quick["effects"]] == [e["noise_pred_rel_change"] for e in result["effects"]]


def test_sample_renders_a_comfy_file_with_two_loras(zimage, dialects, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.png"
    report = cli(["sample", "--checkpoint", str(zimage["comfy"]), "--pipeline", str(zimage["parts"]),
                  "--lora", f"{dialects['kohya']}:0.7", "--lora", str(dialects["peft"]), "--prompt", "a red fox",
                  "-o", str(out), *SIZE, "--json"], capsys, monkeypatch)
    assert out.is_file() and (report["base"], report["guidance"], report["steps"]) == ("zimage", "none", 2)
    assert report["warnings"] == []
    assert all(lora["modules_hit"] == lora["modules"] > 0 for lora in report["loras"])
    image = Image.open(out)
    assert image.size == (32, 32) and RECIPE in image.text["parameters"]


def test_a_comfy_file_takes_a_lone_qwen3_file_and_its_tokenizer_from_pipeline(zimage, dialects, tmp_path, capsys,
                                                                              monkeypatch):
    """ComfyUI's three files: the transformer, Qwen3 (`model.` names, LM head beside) and the VAE; a lone Qwen3 file
    has no tokenizer, which --pipeline gives (one line says so); the verdict and effects are the folder's."""
    watched = watched_tempdir(tmp_path, monkeypatch)
    lora = str(dialects["diffusers"])
    lone = [lora, "--checkpoint", str(zimage["comfy"]), "--text-encoders", str(zimage["qwen3"]), "--vae",
            str(zimage["parts"] / "vae"), *SIZE, "--json"]
    message = cli(["verify", *lone], capsys, monkeypatch, code=1)["error"]
    assert message == ("qwen_3_tiny.safetensors: a lone text-encoder file carries no tokenizer, and adapterzoo ships "
                       "no Qwen2Tokenizer that fits it; give --pipeline DIR, a Z-Image diffusers folder holding "
                       "tokenizer/")
    from_files = cli(["verify", *lone, "--pipeline", str(zimage["tokenizer"])], capsys, monkeypatch)
    from_folder = cli(["verify", lora, "--checkpoint", str(zimage["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert (from_files["verdict"], from_files["base"]) == ("pass", "zimage")
    for a, b in zip(from_files["effects"], from_folder["effects"], strict=True):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-6)
        assert a["mean_abs_pixel_change"] == pytest.approx(b["mean_abs_pixel_change"], rel=1e-4, abs=1e-3)
    assert list(watched.iterdir()) == []
