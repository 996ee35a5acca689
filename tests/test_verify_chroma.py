"""Chroma in verify and sample: a tiny ChromaPipeline built from diffusers classes, loaded as a full folder, as a
BFL single file (in memory, no temporary folder) with a lone T5 file and a lone VAE file, or as a transformer-only
folder with the rest from --pipeline; every LoRA dialect probe reads for Chroma, the approximator's modules
included; the render against diffusers' ChromaPipeline, the run-time LoRA against diffusers' own loader."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from chroma_tiny import CLASSES, T5_TOKENS, save_tiny_chroma
from diffusers import ChromaPipeline
from dit_verify import assert_passes_fully, assert_run_time_equals, cli, watched_tempdir
from flux_tiny import T5_WIDTH, save_lone_ae, save_lone_t5
from PIL import Image
from safetensors.torch import save_file

from adapterzoo.formats.probe import probe
from adapterzoo.verify import denoise
from adapterzoo.verify.pipeline_load import load_for_sampling

SIZE = ["--size", "32x32", "--steps", "2"]
PROMPT = "a photo of a cat"
INNER, MLP, APPROXIMATOR = 32, 128, 32  # the tiny transformer's width, MLP width, approximator width
TARGETS = {  # diffusers module -> (in, out): the approximator, both kinds of block
    "distilled_guidance_layer.in_proj": (16, APPROXIMATOR),
    "distilled_guidance_layer.layers.0.linear_1": (APPROXIMATOR, APPROXIMATOR),
    "distilled_guidance_layer.layers.1.linear_2": (APPROXIMATOR, APPROXIMATOR),
    "distilled_guidance_layer.out_proj": (APPROXIMATOR, INNER),
    "transformer_blocks.0.attn.to_q": (INNER, INNER), "transformer_blocks.0.attn.add_k_proj": (INNER, INNER),
    "transformer_blocks.0.ff.net.0.proj": (INNER, MLP), "single_transformer_blocks.0.attn.to_v": (INNER, INNER),
    "single_transformer_blocks.0.proj_out": (INNER + MLP, INNER),
}


@pytest.fixture(scope="module")
def chroma(tmp_path_factory) -> dict[str, Path]:
    """The tiny pipeline as a folder, its transformer as a BFL single file and as a bare transformer folder (config.json
    beside the weights), a folder of the other parts, the lone T5 and VAE files, and a folder holding only the
    tokenizer."""
    from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint

    root = tmp_path_factory.mktemp("chroma")
    pipe = save_tiny_chroma(root / "pipe")
    convert_checkpoint(pipe, root / "chroma-tiny.safetensors", "ldm")
    return {"pipe": pipe, "bfl": root / "chroma-tiny.safetensors",
            "transformer_only": pipe / "transformer",  # a bare diffusers transformer folder
            "parts": save_tiny_chroma(root / "parts", tuple(n for n in CLASSES if n != "transformer")),
            "t5": save_lone_t5(pipe / "text_encoder", root / "t5xxl_fp16.safetensors"),
            "ae": save_lone_ae(pipe / "vae", root / "ae.safetensors"),
            "tokenizer": save_tiny_chroma(root / "tokenizer", ("tokenizer",))}


def diffusers_lora(path: Path, zero_up: bool = False) -> Path:
    """What diffusers' trainers save for Chroma: `transformer.` paths, lora_A/lora_B, no alpha."""
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for module, (i, o) in TARGETS.items():
        sd[f"transformer.{module}.lora_A.weight"] = torch.randn(4, i, generator=gen) * 0.3
        sd[f"transformer.{module}.lora_B.weight"] = torch.zeros(o, 4) if zero_up else torch.randn(o, 4, generator=gen) * 0.3
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def dialects(chroma, tmp_path_factory) -> dict[str, Path]:
    """One LoRA in each dialect probe reads for Chroma; kohya, BFL (`diffusion_model.`) and PEFT by our converter."""
    from adapterzoo.formats.convert import convert

    root = tmp_path_factory.mktemp("loras")
    files = {"diffusers": diffusers_lora(root / "diffusers.safetensors")}
    for to, name in (("kohya", "kohya.safetensors"), ("bfl", "bfl.safetensors"), ("peft", "peft")):
        convert(files["diffusers"], root / name, to, checkpoint=chroma["pipe"])
        files[to] = root / name
    return files


def test_every_dialect_passes_on_the_full_pipeline_and_zero_is_the_bare_model(chroma, dialects, capsys, monkeypatch):
    for dialect, path in dialects.items():
        found = probe(path)
        assert (found.base, found.format) == ("chroma", dialect), dialect
        result = cli(["verify", str(path), "--checkpoint", str(chroma["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
        assert_passes_fully(result, dialect, "chroma")
    parameters = result["parameters"]  # ChromaPipeline's CFG; the shift follows the size (none recorded)
    assert (parameters["sampler"], parameters["cfg_scale"], parameters["negative_prompt"], parameters["shift"]) == (
        "FlowMatchEulerDiscreteScheduler", 5.0, "", None)


def test_a_zero_up_lora_fails_no_effect(chroma, tmp_path, capsys, monkeypatch):
    path = diffusers_lora(tmp_path / "zero.safetensors", zero_up=True)
    result = cli(["verify", str(path), "--checkpoint", str(chroma["pipe"]), *SIZE, "--json"], capsys, monkeypatch,
                 code=1)
    assert (result["verdict"], result["reasons"]) == ("fail", ["no effect: every lora_up is zero"])


@pytest.fixture(scope="module")
def loaded(chroma):
    return load_for_sampling(chroma["pipe"], "cpu", "fp32")


def test_the_loop_renders_what_chroma_pipeline_renders(chroma, loaded):
    """T5 with its attention mask, the transformer's text mask (the prompt's tokens and the first padding token),
    CFG at 5 with the empty negative prompt, FluxPipeline's sigmas under the size's shift: the latents of
    ChromaPipeline from the same noise, packed and unpacked as it does (its prompt padded to the tokenizer's
    length, as the loop pads it)."""
    pipe = loaded.pipe
    noise = denoise.seeded_noise(pipe, (32, 32), 0)
    predict = denoise.guided(pipe.unet, denoise.encode_prompt(pipe, PROMPT), denoise.encode_prompt(pipe, ""))
    ours = denoise.denoise(pipe, noise, 2, predict)
    reference = ChromaPipeline.from_pretrained(chroma["pipe"], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    b, c, h, w = noise.shape
    theirs = reference(PROMPT, height=32, width=32, num_inference_steps=2, max_sequence_length=T5_TOKENS,
                       latents=reference._pack_latents(noise.clone(), b, c, h, w), output_type="latent").images
    theirs = reference._unpack_latents(theirs, 32, 32, reference.vae_scale_factor)
    assert reference.guidance_scale == denoise.cfg_scale(pipe.unet) == 5.0
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - noise).abs().max() > 0.1


@pytest.mark.parametrize("dialect", ["diffusers", "kohya", "bfl", "peft"])
def test_run_time_equals_diffusers_load_lora_into_transformer(loaded, dialects, dialect):
    """The reference for every dialect is diffusers loading the diffusers file the others were converted from
    (BFL's fused qkv and linear1 split back onto their parts)."""
    reference = copy.deepcopy(loaded.pipe.transformer)
    state_dict, alphas = ChromaPipeline.lora_state_dict(str(dialects["diffusers"]), return_alphas=True)
    ChromaPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=reference)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=gen)
    mask = (torch.arange(9) <= 5).float()[None]  # 5 tokens of the prompt, then the first padding token
    cond = denoise.Conditioning(torch.randn(1, 9, T5_WIDTH, generator=gen), {"mask": mask})
    assert_run_time_equals(loaded, dialects[dialect], reference, x, cond)


def lone_args(chroma, *which: str) -> list[str]:
    """--text-encoders with the lone T5, --vae with the lone VAE, --pipeline with the tokenizer's folder."""
    options = {"t5": ["--text-encoders", str(chroma["t5"])], "ae": ["--vae", str(chroma["ae"])],
               "tokenizer": ["--pipeline", str(chroma["tokenizer"])]}
    return [arg for name in which for arg in options[name]]


def test_a_bfl_file_and_a_transformer_folder_render_as_the_full_pipeline(chroma, dialects, tmp_path, capsys,
                                                                        monkeypatch):
    """The BFL file with the lone T5 and VAE files (the tokenizer from --pipeline; the scheduler the family's default,
    which the tiny folder's equals), and the bare transformer folder with --pipeline: the full folder's coverage and
    effects; nothing written to a temporary folder."""
    watched = watched_tempdir(tmp_path, monkeypatch)
    lora = str(dialects["kohya"])
    full = cli(["verify", lora, "--checkpoint", str(chroma["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    for checkpoint, parts in ((chroma["bfl"], lone_args(chroma, "t5", "ae", "tokenizer")),
                              (chroma["transformer_only"], ["--pipeline", str(chroma["parts"])])):
        result = cli(["verify", lora, "--checkpoint", str(checkpoint), *parts, *SIZE, "--json"], capsys, monkeypatch)
        assert (result["verdict"], result["base"]) == ("pass", "chroma"), checkpoint
        assert result["coverage"] == full["coverage"], checkpoint
        for a, b in zip(result["effects"], full["effects"], strict=True):
            assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-4)
            assert a["mean_abs_pixel_change"] == pytest.approx(b["mean_abs_pixel_change"], rel=1e-4, abs=1e-4)
    assert list(watched.iterdir()) == []


def test_sample_renders_each_source_with_chroma_pipelines_defaults(chroma, dialects, tmp_path, capsys, monkeypatch):
    """No --steps: ChromaPipeline's 35; CFG 5 and the negative prompt recorded in the report and the PNG."""
    out = tmp_path / "bfl.png"
    report = cli(["sample", "--checkpoint", str(chroma["bfl"]), *lone_args(chroma, "t5", "ae", "tokenizer"),
                  "--lora", str(dialects["bfl"]), "--prompt", "a red fox", "--negative-prompt", "snow", "--size",
                  "32x32", "-o", str(out), "--json"], capsys, monkeypatch)
    assert (report["base"], report["steps"], report["cfg_scale"], report["negative_prompt"], report["warnings"]) == (
        "chroma", 35, 5.0, "snow", [])
    assert report["loras"][0]["modules_hit"] == report["loras"][0]["modules"] > 0
    text = Image.open(out).text["parameters"]
    assert "Negative prompt: snow" in text and "Steps: 35" in text and "CFG scale: 5" in text
    for checkpoint, parts in ((chroma["transformer_only"], ["--pipeline", str(chroma["parts"])]), (chroma["pipe"], [])):
        out = tmp_path / f"{checkpoint.stem}.png"
        report = cli(["sample", "--checkpoint", str(checkpoint), *parts, "--lora", str(dialects["peft"]), "--prompt",
                      "a red fox", "-o", str(out), *SIZE, "--json"], capsys, monkeypatch)
        assert out.is_file() and report["loras"][0]["modules_hit"] == report["loras"][0]["modules"] > 0


@pytest.mark.parametrize("which, named", [
    (("t5", "tokenizer"), "no vae (AutoencoderKL) for a Chroma pipeline"),
    (("ae", "tokenizer"), "no text_encoder (T5EncoderModel) for a Chroma pipeline"),
    (("t5", "ae"), "t5xxl_fp16.safetensors: a lone text-encoder file carries no tokenizer"),
])
def test_a_missing_part_is_one_line_naming_it(chroma, dialects, which, named, capsys, monkeypatch):
    message = cli(["verify", str(dialects["kohya"]), "--checkpoint", str(chroma["bfl"]), *lone_args(chroma, *which),
                   *SIZE, "--json"], capsys, monkeypatch, code=1)["error"]
    assert "\n" not in message and named in message, message
    if "tokenizer" not in which:
        assert "T5TokenizerFast" in message and "--pipeline DIR" in message and "tokenizer/" in message



@pytest.fixture(scope="module")
def embedding(chroma) -> Path:
    from embedding_helpers import slot_embedding

    return slot_embedding(chroma["pipe"].parent / "t5style.safetensors", {"t5xxl": T5_WIDTH}, vectors=4, scale=10.0)


def test_a_t5_embedding_acts_on_chromas_one_text_encoder(chroma, embedding, capsys, monkeypatch):
    """ComfyUI's `t5xxl` slot (probed as Flux's: the same T5-XXL) fits Chroma and acts on its T5; multiplier 0 is
    the prompt without the token."""
    result = cli(["verify", str(embedding), "--checkpoint", str(chroma["pipe"]), *SIZE, "--json"], capsys,
                 monkeypatch)
    assert (result["verdict"], result["reasons"]) == ("pass", [])
    coverage = result["coverage"]
    assert coverage["keys_matched"] == coverage["modules_hit"] == coverage["modules_total"] == 1
    zero, *rest = result["effects"]
    assert zero["mean_abs_pixel_change"] == 0 and zero["noise_pred_rel_change"] == 0
    assert all(e["noise_pred_rel_change"] > 1e-3 for e in rest)


def test_embedding_placeholders_encode_as_chroma_pipeline_encodes_added_tokens(loaded, embedding):
    """The prompt with the vectors hooked in: T5's states and the attention mask (the placeholders are the prompt's
    tokens) as ChromaPipeline's own T5 encoding computes them with its tokenizer and T5 extended by the tokens and
    the prompt spelling them out (`tok tok_1 ...`, diffusers' textual-inversion spelling, given as is)."""
    from embedding_helpers import extend, spelled_out

    from adapterzoo.formats.embedding_convert import read_embedding
    from adapterzoo.verify.attach import attach

    pipe = loaded.pipe
    prompt = f"a photo of {embedding.stem}, in the snow"
    vectors = read_embedding(embedding)[0].parts["t5xxl"]
    attached = attach(embedding, probe(embedding), loaded)
    attached.hook()
    try:
        got = denoise.encode_prompt(pipe, prompt, attached.insert())
    finally:
        attached.remove()
    tokenizer, encoder = extend(pipe.tokenizer, pipe.text_encoder, embedding.stem, vectors)
    reference = ChromaPipeline(scheduler=pipe.scheduler.inner, vae=pipe.vae, text_encoder=encoder,
                               tokenizer=tokenizer, transformer=pipe.transformer)
    reference.maybe_convert_prompt = lambda prompt, tokenizer: prompt  # spelled out already
    states, mask = reference._get_t5_prompt_embeds(spelled_out(prompt, embedding.stem, len(vectors)),
                                                   max_sequence_length=T5_TOKENS, device=torch.device("cpu"))
    assert torch.allclose(got.states, states, atol=1e-5, rtol=0)
    assert torch.equal(got.added["mask"], mask) and mask.sum() < T5_TOKENS
    bare = denoise.encode_prompt(pipe, attached.without(prompt))
    assert bare.added["mask"].sum() == mask.sum() - len(vectors)
