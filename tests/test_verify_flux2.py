"""Flux.2 Klein in verify and sample: a tiny Flux2KleinPipeline (27-layer Qwen3, Z-Image's test tokenizer) loaded as
a full folder or as BFL's single file (in memory) with the other parts from --pipeline; every LoRA dialect probe
reads for Flux.2; the loop against diffusers' Flux2KleinPipeline for the distilled (no CFG) and base (CFG 4)
Kleins from the same seed, the run-time LoRA against diffusers' own Flux.2 LoRA loader; dev refused in one line."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy
import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from dit_verify import assert_passes_fully, assert_run_time_equals, block_linears, cli, diffusers_lora, watched_tempdir
from flux2_tiny import CAP, CLASSES, save_bfl_file, save_tiny_klein, tiny_transformer, tiny_vae
from PIL import Image
from safetensors.torch import save_file
from transformers import Qwen3ForCausalLM
from zimage_tiny import save_qwen3_file

from adapterzoo.formats.probe import probe
from adapterzoo.verify import denoise
from adapterzoo.verify.pipeline_load import LoadedPipeline, load_for_sampling
from adapterzoo.verify.verifier import default_steps, guidance_parameters

SIZE = ["--size", "32x32", "--steps", "2"]
PROMPT = "a photo of a cat"
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")
RECIPE = "Sampler: FlowMatchEulerDiscreteScheduler, Guidance: none,"  # the distilled Klein's, in the PNG


@pytest.fixture(scope="module")
def klein(tmp_path_factory) -> dict[str, Path]:
    """Distilled and base pipeline folders (model_index.json's is_distilled), a folder of every part but the
    transformer, BFL's single file of the distilled transformer, ComfyUI's lone Qwen3 file and a tokenizer."""
    root = tmp_path_factory.mktemp("klein")
    distilled = save_tiny_klein(root / "FLUX.2-klein-4B")
    return {"pipe": distilled, "base": save_tiny_klein(root / "FLUX.2-klein-base-4B", distilled=False),
            "parts": save_tiny_klein(root / "parts", parts=tuple(n for n in CLASSES if n != "transformer")),
            "bfl": save_bfl_file(root / "flux-2-klein-4b.safetensors", distilled / "transformer"),
            "qwen3": save_qwen3_file(root / "qwen_3_tiny.safetensors",
                                     Qwen3ForCausalLM.from_pretrained(distilled / "text_encoder").model),
            "tokenizer": save_tiny_klein(root / "tokenizer_only", parts=("tokenizer",))}


@pytest.fixture(scope="module")
def loaded(klein) -> Callable[[str], LoadedPipeline]:
    """The pipeline of a folder of `klein`, loaded once for the tests that call its parts directly."""
    pipelines: dict[str, LoadedPipeline] = {}

    def load(variant: str) -> LoadedPipeline:
        if variant not in pipelines:
            pipelines[variant] = load_for_sampling(klein[variant], "cpu", "fp32")
        return pipelines[variant]

    return load


def transformer_linears(folder: Path) -> dict[str, tuple[int, int]]:
    """Every Linear of the tiny transformer's double and single blocks, by its `transformer.` path -> (in, out)."""
    return block_linears(Flux2Transformer2DModel.from_pretrained(folder / "transformer"), BLOCKS, "transformer.")


@pytest.fixture(scope="module")
def dialects(klein, tmp_path_factory) -> dict[str, Path]:
    """One file in each dialect probe reads for Flux.2: diffusers, and by our converter musubi's kohya names
    (BFL's, q, k, v fused), BFL/ComfyUI `diffusion_model.` and PEFT."""
    from adapterzoo.formats.convert import convert

    root = tmp_path_factory.mktemp("loras")
    files = {"diffusers": diffusers_lora(root / "diffusers.safetensors", transformer_linears(klein["pipe"]))}
    for to, name in (("kohya", "musubi.safetensors"), ("bfl", "bfl.safetensors"), ("peft", "peft")):
        convert(files["diffusers"], root / name, to, checkpoint=klein["pipe"])
        files[to] = root / name
    return files


def test_every_dialect_passes_on_the_folder_and_the_bfl_file_a_zero_up_lora_fails(klein, dialects, tmp_path, capsys,
                                                                                   monkeypatch):
    """One run over every dialect and a zero-up LoRA on the full folder: each dialect passes with full coverage,
    multiplier 0 bit-identical to the bare model; the zero-up file fails "no effect". BFL's single file without
    its parts is one line naming them, and with --pipeline (--quick) gives the folder's noise-prediction effects,
    nothing written to temp."""
    zero = diffusers_lora(tmp_path / "zero.safetensors", transformer_linears(klein["pipe"]), zero_up=True)
    results = cli(["verify", *map(str, dialects.values()), str(zero), "--checkpoint", str(klein["pipe"]), *SIZE,
                   "--json"], capsys, monkeypatch, code=1)
    *passed, failed = results
    assert (failed["verdict"], failed["reasons"]) == ("fail", ["no effect: every lora_up is zero"])
    for dialect, result in zip(dialects, passed, strict=True):
        assert probe(dialects[dialect]).format == dialect, dialect
        assert_passes_fully(result, dialect, "flux2")
    parameters = passed[0]["parameters"]
    assert (parameters["sampler"], parameters["guidance"], parameters["steps"]) == (
        "FlowMatchEulerDiscreteScheduler", "none", 2)
    assert "cfg_scale" not in parameters and "negative_prompt" not in parameters

    watched = watched_tempdir(tmp_path, monkeypatch)
    lora = str(dialects["bfl"])
    message = cli(["verify", lora, "--checkpoint", str(klein["bfl"]), *SIZE, "--json"], capsys, monkeypatch,
                  code=1)["error"]
    assert "\n" not in message
    assert "no vae (AutoencoderKLFlux2), text_encoder (Qwen3Model) for a Flux.2 pipeline" in message
    assert "--pipeline" in message
    from_file = cli(["verify", lora, "--checkpoint", str(klein["bfl"]), "--pipeline", str(klein["parts"]), *SIZE,
                     "--quick", "--json"], capsys, monkeypatch)
    from_folder = passed[list(dialects).index("bfl")]
    assert (from_file["verdict"], from_file["base"], from_file["quick"]) == ("pass", "flux2", True)
    for a, b in zip(from_file["effects"], from_folder["effects"], strict=True):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-6)
    assert list(watched.iterdir()) == []


@pytest.mark.parametrize("loaded_from, distilled", [
    ("/models/diffusion_models/flux-2-klein-base-4b.safetensors", False),
    ("/models/diffusion_models/flux-2-klein-9b.safetensors", True),
    ("/models/FLUX.2-klein-base-9B/transformer", False),  # a transformer folder without model_index.json
    ("/models/my-finetune.safetensors", True)])  # unsaid: distilled, what the Klein renders are made with
def test_a_file_is_distilled_unless_its_name_says_base(loaded_from, distilled):
    from types import SimpleNamespace

    from adapterzoo.formats.families.flux2.sampling import is_distilled

    assert is_distilled(SimpleNamespace(config={"_name_or_path": loaded_from})) is distilled


@pytest.mark.parametrize("variant, steps, guidance", [
    ("pipe", 4, {"guidance": "none"}),
    ("base", 50, {"negative_prompt": "", "cfg_scale": 4.0})])
def test_the_loop_renders_what_flux2_klein_pipeline_renders(klein, loaded, variant, steps, guidance):
    """From the same seed: Qwen3's layers 9, 18, 27, the patched and batch-normalised noise, the empirical mu, and
    for base CFG 4 with the empty negative prompt give Flux2KleinPipeline's latents (as its loop holds them) and,
    its batch norm and patching undone, its image. Distilled renders 4 steps without CFG, base 50 with it."""
    pipe = loaded(variant).pipe
    assert (default_steps(pipe), guidance_parameters(pipe)) == (steps, guidance)
    noise = denoise.seeded_noise(pipe, (32, 32), 0)
    predict = denoise.guided(pipe.unet, denoise.encode_prompt(pipe, PROMPT), denoise.encode_prompt(pipe, ""))
    ours, image = denoise.render(pipe, noise, 2, predict)
    reference = Flux2KleinPipeline.from_pretrained(klein[variant], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    final = {}

    def keep(pipeline, step, t, tensors):  # the packed, patched and normalised latents after each step
        final.update(tensors)
        return {}

    their_image = reference(prompt=PROMPT, num_inference_steps=2, height=32, width=32, output_type="pt",
                            generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=keep).images[0]
    assert (ours - noise).abs().max() > 0.1
    assert torch.allclose(Flux2KleinPipeline._pack_latents(ours), final["latents"], atol=1e-5, rtol=0)
    assert (image - (their_image.permute(1, 2, 0) * 255).round()).abs().max() <= 1


def test_run_time_equals_diffusers_load_lora_into_transformer(loaded, dialects):
    """diffusers reads the diffusers, musubi and BFL files itself: each is the reference for its own file; PEFT's
    folder against the diffusers file it was converted from."""
    pipeline = loaded("pipe")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, 4, generator=gen)
    cond = denoise.Conditioning(torch.randn(1, 12, 3 * CAP, generator=gen))
    for dialect, source in (("diffusers", "diffusers"), ("kohya", "kohya"), ("bfl", "bfl"), ("peft", "diffusers")):
        reference = copy.deepcopy(pipeline.pipe.transformer)
        Flux2KleinPipeline.load_lora_into_transformer(Flux2KleinPipeline.lora_state_dict(str(dialects[source])),
                                                      transformer=reference)
        assert_run_time_equals(pipeline, dialects[dialect], reference, x, cond)


def test_sample_renders_a_bfl_file_with_two_loras_from_its_parts_or_comfyuis_files(klein, dialects, tmp_path, capsys,
                                                                                   monkeypatch):
    """BFL's file with the parts from --pipeline, and with ComfyUI's: a lone Qwen3 file (`model.` names), the
    VAE's folder and only the tokenizer from --pipeline: the same picture, its recipe in the PNG."""
    loras = ["--lora", f"{dialects['kohya']}:0.7", "--lora", str(dialects["peft"]), "--prompt", "a red fox", *SIZE]
    out, lone = tmp_path / "out.png", tmp_path / "lone.png"
    report = cli(["sample", "--checkpoint", str(klein["bfl"]), "--pipeline", str(klein["parts"]), *loras,
                  "-o", str(out), "--json"], capsys, monkeypatch)
    assert out.is_file() and (report["base"], report["guidance"], report["steps"]) == ("flux2", "none", 2)
    assert report["warnings"] == []
    assert all(lora["modules_hit"] == lora["modules"] > 0 for lora in report["loras"])
    image = Image.open(out)
    assert image.size == (32, 32) and RECIPE in image.text["parameters"]
    cli(["sample", "--checkpoint", str(klein["bfl"]), "--text-encoders", str(klein["qwen3"]), "--vae",
         str(klein["parts"] / "vae"), "--pipeline", str(klein["tokenizer"]), *loras, "-o", str(lone), "--json"],
        capsys, monkeypatch)
    assert numpy.array_equal(numpy.asarray(Image.open(lone)), numpy.asarray(image))


def test_flux2_dev_is_refused_in_one_line(klein, dialects, tmp_path, capsys, monkeypatch):
    """dev is the member with a guidance embedding; its Mistral text encoder is never loaded."""
    dev = tmp_path / "flux2-dev.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_transformer(guidance=True).state_dict().items()}, str(dev))
    message = cli(["verify", str(dialects["diffusers"]), "--checkpoint", str(dev), "--pipeline", str(klein["parts"]),
                   *SIZE, "--json"], capsys, monkeypatch, code=1)["error"]
    assert message.startswith("flux2-dev.safetensors: Flux.2 dev is not rendered by verify and sample yet")
    assert "\n" not in message and "Mistral" in message


@pytest.mark.parametrize("width, layers, said", [
    (CAP, 26, "the text encoder has 26 layers; Flux.2 Klein reads layers 9, 18, 27 (Qwen3-4B or -8B)"),
    (2 * CAP, 27, ("the text encoder is 64 wide, the transformer reads 3 × 32: Klein 4B takes Qwen3-4B, Klein 9B "
                   "Qwen3-8B"))])
def test_a_qwen3_that_does_not_fit_the_transformer_is_one_line(width, layers, said):
    from types import SimpleNamespace

    from adapterzoo.errors import AdapterzooError
    from adapterzoo.formats.families.flux2.sampling import check_text_encoder

    with pytest.raises(AdapterzooError) as caught:
        check_text_encoder(SimpleNamespace(hidden_size=width, num_hidden_layers=layers),
                           SimpleNamespace(joint_attention_dim=3 * CAP))
    assert str(caught.value) == said


def test_a_klein_4b_lora_that_flux1_claims_too_is_verified_on_a_klein(tmp_path):
    """A real-size Klein 4B LoRA of the double blocks' attention alone has Flux.1's shapes: probe reads it as
    Flux.1's and says it fits Flux.2 too, so a Klein checkpoint takes it; another base still refuses it."""
    import factory
    from test_flux2 import real_lora_specs

    from adapterzoo.errors import AdapterzooError
    from adapterzoo.verify.verifier import refuse_other_base

    lora = factory.write_sparse_safetensors(tmp_path / "a.safetensors", real_lora_specs("klein-4b", attention_only=True))
    found = probe(lora)
    assert (found.base, found.details["also_fits"]) == ("flux", ["flux2", "chroma"])
    refuse_other_base(lora, found, "flux2", tmp_path / "flux-2-klein-4b.safetensors")
    with pytest.raises(AdapterzooError, match="flux LoRA, zimage checkpoint"):
        refuse_other_base(lora, found, "zimage", tmp_path / "z_image_turbo.safetensors")


def test_a_lone_vae_file_is_refused_on_a_klein_in_one_line(klein, tmp_path):
    from adapterzoo.errors import AdapterzooError
    from adapterzoo.formats.families.flux2.sampling import PatchedVae
    from adapterzoo.verify.vae_load import load_vae

    with pytest.raises(AdapterzooError) as caught:
        load_vae(klein["parts"] / "vae" / "diffusion_pytorch_model.safetensors", "flux2", PatchedVae(tiny_vae()))
    assert str(caught.value) == ("diffusion_pytorch_model.safetensors: a lone VAE file is verified on checkpoints "
                                 "whose VAE is an AutoencoderKL; a flux2 checkpoint renders with another")
