"""Qwen-Image in verify and sample: a tiny QwenImagePipeline (Qwen2.5-VL text encoder, byte-level tokenizer written by
the test) loaded as a full folder and as ComfyUI's single file (in memory, no temporary folder) with the other parts
from --pipeline; every LoRA dialect probe reads for Qwen-Image; the render against diffusers' QwenImagePipeline
(true CFG, renormed), the run-time LoRA against diffusers' own Qwen-Image LoRA loader; Edit and Layered refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from dit_verify import assert_passes_fully, assert_run_time_equals, cli, watched_tempdir
from PIL import Image
from qwen_image_tiny import CLASSES, TEXT, save_comfy_file, save_tiny_qwen_image
from safetensors.torch import save_file

from adapterzoo.formats.families.flux.sampling import pack
from adapterzoo.formats.probe import probe
from adapterzoo.verify import denoise
from adapterzoo.verify.pipeline_load import load_for_sampling
from adapterzoo.verify.verifier import default_steps, guidance_parameters

SIZE = ["--size", "32x32", "--steps", "2"]
PROMPT = "a photo of a cat"
RECIPE = "Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 4.0,"  # in the PNG


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> dict[str, Path]:
    """The pipeline folder, a folder of every part but the transformer, and ComfyUI's single file of the same
    transformer."""
    root = tmp_path_factory.mktemp("qwen_image")
    pipe = save_tiny_qwen_image(root / "Qwen-Image")
    transformer = QwenImageTransformer2DModel.from_pretrained(pipe / "transformer")
    return {"pipe": pipe, "parts": save_tiny_qwen_image(root / "parts", tuple(n for n in CLASSES if n != "transformer")),
            "comfy": save_comfy_file(root / "qwen_image_tiny.safetensors", transformer)}


@pytest.fixture(scope="module")
def loaded(qwen):
    return load_for_sampling(qwen["pipe"], "cpu", "fp32")


def diffusers_lora(path: Path, transformer: torch.nn.Module, zero_up: bool = False) -> Path:
    """What diffusers' Qwen-Image trainer saves: `transformer.` paths of every block Linear, lora_A/lora_B, no alpha."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks."):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=gen) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = (torch.zeros(m.out_features, 4) if zero_up
                                                       else torch.randn(m.out_features, 4, generator=gen) * 0.3)
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def dialects(qwen, loaded, tmp_path_factory) -> dict[str, Path]:
    """One file in each dialect probe reads for Qwen-Image: diffusers, and by our converter musubi's kohya names,
    ComfyUI's (`diffusion_model.`, alpha folded) and PEFT."""
    from adapterzoo.formats.convert import convert

    root = tmp_path_factory.mktemp("loras")
    files = {"diffusers": diffusers_lora(root / "diffusers.safetensors", loaded.pipe.transformer)}
    for to, name in (("kohya", "musubi.safetensors"), ("comfy", "comfy.safetensors"), ("peft", "peft")):
        convert(files["diffusers"], root / name, to, checkpoint=qwen["pipe"])
        files[to] = root / name
    return files


def test_every_dialect_passes_on_the_full_pipeline_and_zero_is_the_bare_model(qwen, dialects, capsys, monkeypatch):
    for dialect, path in dialects.items():
        assert probe(path).format == dialect, dialect
        result = cli(["verify", str(path), "--checkpoint", str(qwen["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
        assert_passes_fully(result, dialect, "qwen_image")
    parameters = result["parameters"]
    assert (parameters["sampler"], parameters["cfg_scale"], parameters["negative_prompt"], parameters["steps"]) == (
        "FlowMatchEulerDiscreteScheduler", 4.0, "", 2)
    assert parameters["shift"] is None  # dynamic: it follows the image's tokens


def test_a_zero_up_lora_fails_no_effect(qwen, loaded, tmp_path, capsys, monkeypatch):
    path = diffusers_lora(tmp_path / "zero.safetensors", loaded.pipe.transformer, zero_up=True)
    result = cli(["verify", str(path), "--checkpoint", str(qwen["pipe"]), *SIZE, "--json"], capsys, monkeypatch,
                 code=1)
    assert (result["verdict"], result["reasons"]) == ("fail", ["no effect: every lora_up is zero"])


def test_the_loop_renders_what_qwen_image_pipeline_renders(qwen, loaded):
    """The templated prompt's Qwen2.5-VL states less the system turn, the packed latents, the dynamic shift, and
    true CFG at 4 with its renorm: the latents of QwenImagePipeline from the same noise (and its decoded image),
    at the recorded defaults (50 steps, CFG 4 with the empty negative prompt)."""
    pipe = loaded.pipe
    assert (default_steps(pipe), guidance_parameters(pipe)) == (50, {"negative_prompt": "", "cfg_scale": 4.0})
    noise = denoise.seeded_noise(pipe, (32, 32), 0)
    predict = denoise.guided(pipe.unet, denoise.encode_prompt(pipe, PROMPT), denoise.encode_prompt(pipe, ""))
    ours = denoise.denoise(pipe, noise, 2, predict)
    reference = QwenImagePipeline.from_pretrained(qwen["pipe"], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    call = {"negative_prompt": "", "true_cfg_scale": 4.0, "num_inference_steps": 2, "height": 32, "width": 32}
    theirs = reference(PROMPT, latents=pack(noise)[0], output_type="latent", **call).images
    assert (ours - noise).abs().max() > 0.1
    assert torch.allclose(pack(ours)[0], theirs, atol=1e-5, rtol=0)
    image = reference(PROMPT, latents=pack(noise)[0], output_type="pt", **call).images[0]
    assert (denoise.decode(pipe.vae, ours) - image.permute(1, 2, 0) * 255).abs().max() <= 0.5 + 1e-3


def test_run_time_equals_diffusers_load_lora_into_transformer(loaded, dialects):
    """diffusers reads each dialect itself (its Qwen-Image loader takes musubi's and ComfyUI's names too), but PEFT's
    folder, which is checked against the diffusers file it was converted from."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    cond = denoise.Conditioning(torch.randn(1, 12, TEXT, generator=gen), {"mask": torch.ones(1, 12, dtype=torch.bool)})
    cond.added["mask"][0, 9:] = False  # padding the transformer never attends to
    for dialect, source in (("diffusers", "diffusers"), ("kohya", "kohya"), ("comfy", "comfy"),
                            ("peft", "diffusers")):
        reference = copy.deepcopy(loaded.pipe.transformer)
        QwenImagePipeline.load_lora_into_transformer(QwenImagePipeline.lora_state_dict(str(dialects[source])),
                                                     transformer=reference)
        assert_run_time_equals(loaded, dialects[dialect], reference, x, cond)


def test_a_comfy_file_loads_in_memory_with_the_pipelines_parts(qwen, dialects, tmp_path, capsys, monkeypatch):
    watched = watched_tempdir(tmp_path, monkeypatch)
    lora = str(dialects["comfy"])
    message = cli(["verify", lora, "--checkpoint", str(qwen["comfy"]), *SIZE, "--json"], capsys, monkeypatch,
                  code=1)["error"]
    assert "\n" not in message and ("no vae (AutoencoderKLQwenImage), text_encoder "
                                    "(Qwen2_5_VLForConditionalGeneration) for a Qwen-Image pipeline") in message
    assert "--pipeline" in message
    grid = tmp_path / "grid.png"
    from_file = cli(["verify", lora, "--checkpoint", str(qwen["comfy"]), "--pipeline", str(qwen["parts"]), *SIZE,
                     "-o", str(grid), "--json"], capsys, monkeypatch)
    from_folder = cli(["verify", lora, "--checkpoint", str(qwen["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert from_file["verdict"] == "pass" and from_file["base"] == "qwen_image"
    for a, b in zip(from_file["effects"], from_folder["effects"], strict=True):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-6)
        assert a["mean_abs_pixel_change"] == pytest.approx(b["mean_abs_pixel_change"], rel=1e-4, abs=1e-3)
    assert list(watched.iterdir()) == []
    assert RECIPE in Image.open(grid).text["parameters"]


def test_sample_renders_a_comfy_file_with_component_folders_and_two_loras(qwen, dialects, tmp_path, capsys,
                                                                          monkeypatch):
    """The text encoder's folder (its tokenizer found beside it) and the VAE's folder stand for --pipeline."""
    out = tmp_path / "out.png"
    parts = ["--text-encoders", str(qwen["parts"] / "text_encoder"), "--vae", str(qwen["parts"] / "vae")]
    report = cli(["sample", "--checkpoint", str(qwen["comfy"]), *parts,
                  "--lora", f"{dialects['kohya']}:0.7", "--lora", str(dialects["peft"]), "--prompt", "a red fox",
                  "-o", str(out), *SIZE, "--json"], capsys, monkeypatch)
    assert out.is_file() and (report["base"], report["cfg_scale"], report["steps"]) == ("qwen_image", 4.0, 2)
    assert report["warnings"] == []
    assert all(lora["modules_hit"] == lora["modules"] > 0 for lora in report["loras"])
    image = Image.open(out)
    assert image.size == (32, 32) and RECIPE in image.text["parameters"]


@pytest.mark.parametrize("config, name, said", [
    ({"zero_cond_t": True}, "Qwen-Image-Edit-2511", "is Qwen-Image-Edit, which renders from an input image"),
    ({}, "qwen_image_edit_2509_bf16.safetensors", "is Qwen-Image-Edit, which renders from an input image"),
    ({"use_additional_t_cond": True}, "Qwen-Image-Layered", "is Qwen-Image-Layered, which decomposes an input image")])
def test_edit_and_layered_are_refused_in_one_line(config, name, said):
    from types import SimpleNamespace

    from adapterzoo.errors import AdapterzooError
    from adapterzoo.formats.families.qwen_image.sampling import refuse_image_models

    with pytest.raises(AdapterzooError) as refused:
        refuse_image_models(SimpleNamespace(config={**config, "_name_or_path": f"/models/{name}"}))
    assert str(refused.value).startswith(f"/models/{name} {said}") and "\n" not in str(refused.value)
