"""SD3/SD3.5 in verify and sample (issue 15 §1): a tiny SD3.5-Medium-shaped pipeline built from diffusers classes,
loaded as a full folder (with or without T5) or as an SAI single file (in memory, no temporary folder) with the
other parts from --pipeline; every LoRA dialect probe reads for SD3; the render against diffusers'
StableDiffusion3Pipeline, the run-time LoRA against diffusers' own SD3 LoRA loader."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders import SD3LoraLoaderMixin
from dit_verify import assert_passes_fully, assert_run_time_equals, block_linears, cli, diffusers_lora, watched_tempdir
from PIL import Image
from safetensors.torch import load_file, save_file
from sd3_tiny import (
    CLASSES,
    CLIP_WIDTHS,
    PROJECTION,
    T5_WIDTH,
    WIDTH,
    WITHOUT_T5,
    save_sai_file,
    save_tiny_sd3,
    tiny_sai_tensors,
)

from adapterzoo.formats.probe import probe
from adapterzoo.verify import denoise
from adapterzoo.verify.attach import attach
from adapterzoo.verify.pipeline_load import load_for_sampling
from adapterzoo.verify.pipeline_parts import GivenParts

SIZE = ["--size", "32x32", "--steps", "2"]
PROMPT = "a photo of a cat"
# text-encoder modules (diffusers paths) -> (in, out): CLIP-L, CLIP-G and T5 each take a LoRA
ENCODER_TARGETS = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (CLIP_WIDTHS[0], CLIP_WIDTHS[0]),
                   "text_encoder_2.text_model.encoder.layers.1.mlp.fc1": (CLIP_WIDTHS[1], 2 * CLIP_WIDTHS[1]),
                   "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q": (T5_WIDTH, T5_WIDTH)}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> dict[str, Path]:
    """The tiny pipeline as a folder with T5, one without, the SAI single file of its transformer, and a folder
    of every other part (for the single file's --pipeline)."""
    root = tmp_path_factory.mktemp("sd3")
    sai = tiny_sai_tensors()
    return {"pipe": save_tiny_sd3(root / "pipe", sai), "no_t5": save_tiny_sd3(root / "no_t5", sai, WITHOUT_T5),
            "parts": save_tiny_sd3(root / "parts", sai, tuple(n for n in CLASSES if n != "transformer")),
            "sai": save_sai_file(root / "sd35-tiny.safetensors", sai), "root": root}


def transformer_linears(folder: Path) -> dict[str, tuple[int, int]]:
    """Every Linear of the tiny transformer's joint blocks, by its `transformer.` path -> (in, out)."""
    return block_linears(SD3Transformer2DModel.from_pretrained(folder / "transformer"), ("transformer_blocks.",),
                         "transformer.")


def lycoris(path: Path, algo: str) -> Path:
    """LoKr or LoHa on SAI's fused qkv of block 0 (48 × 16) and one MLP Linear, in kohya's names; unit-scale
    factors, so two Linears move the prediction past the verdict's floor."""
    gen = torch.Generator().manual_seed(7)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    if algo == "lokr":
        sd = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w1": r(4, 2),
              "lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w2": r(12, 8),
              "lora_unet_joint_blocks_1_context_block_mlp_fc1.lokr_w1": r(4, 4),
              "lora_unet_joint_blocks_1_context_block_mlp_fc1.lokr_w2": r(4 * WIDTH // 4, WIDTH // 4)}
    else:
        sd = {}
        for stem, (o, i) in (("lora_unet_joint_blocks_0_x_block_attn_qkv", (3 * WIDTH, WIDTH)),
                             ("lora_unet_joint_blocks_2_x_block_mlp_fc2", (WIDTH, 4 * WIDTH))):
            sd |= {f"{stem}.hada_w1_a": r(o, 2), f"{stem}.hada_w1_b": r(2, i), f"{stem}.hada_w2_a": r(o, 2),
                   f"{stem}.hada_w2_b": r(2, i), f"{stem}.alpha": torch.tensor(2.0)}
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def dialects(sd3, tmp_path_factory) -> dict[str, Path]:
    """One file in each dialect probe reads for SD3: diffusers (transformer and all three text encoders) and, by
    our converter, kohya (lora_unet/lora_te1..3), ComfyUI (diffusion_model.joint_blocks) and PEFT; LoKr, LoHa."""
    from adapterzoo.formats.convert import convert

    root = tmp_path_factory.mktemp("loras")
    targets = transformer_linears(sd3["pipe"])
    files = {"diffusers": diffusers_lora(root / "diffusers.safetensors", targets | ENCODER_TARGETS)}
    transformer_only = diffusers_lora(root / "transformer_only.safetensors", targets)
    files["kohya"] = root / "kohya.safetensors"
    convert(files["diffusers"], files["kohya"], "kohya", checkpoint=sd3["pipe"])
    for to, name in (("comfy", "comfy.safetensors"), ("peft", "peft")):  # neither writes text encoders for SD3
        convert(transformer_only, root / name, to, checkpoint=sd3["pipe"])
        files[to] = root / name
    files["lokr"] = lycoris(root / "lokr.safetensors", "lokr")
    files["loha"] = lycoris(root / "loha.safetensors", "loha")
    return files


def test_every_dialect_passes_on_the_full_pipeline_and_zero_is_the_bare_model(sd3, dialects, capsys, monkeypatch):
    formats = {"diffusers": "diffusers", "kohya": "kohya", "comfy": "comfy", "peft": "peft", "lokr": "lycoris",
               "loha": "lycoris"}
    for dialect, path in dialects.items():
        found = probe(path)
        assert found.format == formats[dialect]
        # the tiny width says no base: the diffusers file has no metadata, PEFT's comes from our converter's
        assert found.base == ("unknown" if dialect == "diffusers" else "sd35"), dialect
        result = cli(["verify", str(path), "--checkpoint", str(sd3["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
        assert_passes_fully(result, dialect)
    parameters = result["parameters"]
    assert (parameters["sampler"], parameters["cfg_scale"], parameters["shift"]) == (
        "FlowMatchEulerDiscreteScheduler", 7.0, 3.0)


def test_a_zero_up_lora_fails_no_effect(sd3, tmp_path, capsys, monkeypatch):
    path = diffusers_lora(tmp_path / "zero.safetensors",
                          transformer_linears(sd3["pipe"]), zero_up=True)
    result = cli(["verify", str(path), "--checkpoint", str(sd3["pipe"]), *SIZE, "--json"], capsys, monkeypatch,
                 code=1)
    assert (result["verdict"], result["reasons"]) == ("fail", ["no effect: every lora_up is zero"])


@pytest.mark.parametrize("folder", ["pipe", "no_t5"])
def test_the_loop_renders_what_stable_diffusion_3_pipeline_renders(sd3, folder):
    """Prompt encoding (CLIP-L and CLIP-G penultimate states padded to T5's width, T5's states or zeros without
    it, both pooled projections), CFG and the flow-matching steps with the scheduler's shift: the latents of
    StableDiffusion3Pipeline from the same noise."""
    loaded = load_for_sampling(sd3[folder], "cpu", "fp32")
    pipe = loaded.pipe
    noise = denoise.seeded_noise(pipe, (32, 32), 0)
    predict = denoise.guided(pipe.unet, denoise.encode_prompt(pipe, PROMPT), denoise.encode_prompt(pipe, ""))
    ours = denoise.denoise(pipe, noise, 2, predict)
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if folder == "no_t5" else {}
    reference = StableDiffusion3Pipeline.from_pretrained(sd3[folder], local_files_only=True, **without_t5)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPT, negative_prompt="", num_inference_steps=2, guidance_scale=denoise.GUIDANCE_SCALE,
                       height=32, width=32, latents=noise.clone(), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def _inputs() -> tuple[torch.Tensor, denoise.Conditioning]:
    """A fixed latent and text condition of the tiny SD3's widths."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    pooled = torch.randn(1, 2 * PROJECTION, generator=gen)
    return x, denoise.Conditioning(torch.randn(1, 9, T5_WIDTH, generator=gen), {"pooled": pooled})


@pytest.mark.parametrize("dialect", ["diffusers", "kohya", "comfy", "peft"])
def test_run_time_equals_diffusers_load_lora_into_transformer(sd3, dialects, dialect):
    """diffusers reads no kohya or ComfyUI SD3 names, so the reference for every dialect is diffusers loading the
    diffusers file the others were converted from (q, k, v fused into SAI's qkv and split back)."""
    loaded = load_for_sampling(sd3["pipe"], "cpu", "fp32")
    reference = copy.deepcopy(loaded.pipe.transformer)
    state_dict = SD3LoraLoaderMixin.lora_state_dict(str(dialects["diffusers"]))
    SD3LoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=reference)
    assert_run_time_equals(loaded, dialects[dialect], reference, *_inputs())


def test_an_sai_file_loads_in_memory_with_the_pipelines_parts(sd3, dialects, tmp_path, capsys, monkeypatch):
    watched = watched_tempdir(tmp_path, monkeypatch)
    lora = str(dialects["kohya"])
    message = cli(["verify", lora, "--checkpoint", str(sd3["sai"]), *SIZE, "--json"], capsys, monkeypatch,
                  code=1)["error"]
    assert "\n" not in message and "no vae (AutoencoderKL), text_encoder (" in message and "--pipeline" in message
    grid = tmp_path / "grid.png"
    from_file = cli(["verify", lora, "--checkpoint", str(sd3["sai"]), "--pipeline", str(sd3["parts"]), *SIZE,
                     "-o", str(grid), "--json"], capsys, monkeypatch)
    from_folder = cli(["verify", lora, "--checkpoint", str(sd3["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert from_file["verdict"] == "pass" and from_file["base"] == "sd35"
    for a, b in zip(from_file["effects"], from_folder["effects"], strict=True):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4)
        assert a["mean_abs_pixel_change"] == pytest.approx(b["mean_abs_pixel_change"], rel=1e-4, abs=1e-3)
    assert list(watched.iterdir()) == []
    text = Image.open(grid).text["parameters"]
    assert "Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 7.0, Shift: 3.0," in text


def test_quick_verify_passes_without_rendering(sd3, dialects, capsys, monkeypatch):
    result = cli(["verify", str(dialects["comfy"]), "--checkpoint", str(sd3["sai"]), "--pipeline", str(sd3["parts"]),
                  *SIZE, "--quick", "--json"], capsys, monkeypatch)
    assert result["verdict"] == "pass" and result["quick"] and result["grid"] is None
    assert [e["mean_abs_pixel_change"] for e in result["effects"]] == [None, None, None]
    assert result["effects"][0]["noise_pred_rel_change"] == 0 and result["effects"][2]["noise_pred_rel_change"] > 1e-3


def test_sample_renders_an_sai_file_with_two_loras(sd3, dialects, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.png"
    report = cli(["sample", "--checkpoint", str(sd3["sai"]), "--pipeline", str(sd3["parts"]),
                  "--lora", f"{dialects['kohya']}:0.7", "--lora", str(dialects["lokr"]), "--prompt", "a red fox",
                  "-o", str(out), *SIZE, "--json"], capsys, monkeypatch)
    assert out.is_file() and report["base"] == "sd35" and report["warnings"] == []
    assert all(lora["modules_hit"] == lora["modules"] > 0 for lora in report["loras"])
    image = Image.open(out)
    assert image.size == (32, 32)
    assert "Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 7.0, Shift: 3.0," in image.text["parameters"]


def test_a_transformer_folder_takes_the_rest_from_pipeline(sd3, dialects, capsys, monkeypatch):
    result = cli(["verify", str(dialects["peft"]), "--checkpoint", str(sd3["pipe"] / "transformer"),
                  "--pipeline", str(sd3["parts"]), *SIZE, "--quick", "--json"], capsys, monkeypatch)
    assert (result["verdict"], result["base"]) == ("pass", "sd35")


# -- parts from lone files (--text-encoders, --vae): ComfyUI's clip_l, clip_g, t5xxl and SD3's VAE ---------------


@pytest.fixture(scope="module")
def lone(sd3) -> dict[str, Path]:
    """The tiny pipeline's encoders and VAE as the single files ComfyUI users keep: clip_l and clip_g in
    CLIPTextModel names under `text_model.` with `text_projection.weight` beside, t5xxl in T5EncoderModel's encoder
    names with the embedding once (`shared.weight`), the VAE in LDM names (attention as 1x1 convs), and the SAI
    file with that VAE inside (`first_stage_model.`); and a folder holding only the three tokenizers (the tiny
    vocabulary is not CLIP's, so none ships for it)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from adapterzoo.formats.model.vae_names import diffusers_to_ldm_vae, is_attention_weight

    root, pipe = sd3["root"] / "lone", sd3["pipe"]
    root.mkdir()
    for slot, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        clip = CLIPTextModelWithProjection.from_pretrained(pipe / slot).state_dict()
        assert all(k.startswith(("text_model.", "text_projection.")) for k in clip)  # ComfyUI's names already
        save_file({k: v.contiguous() for k, v in clip.items()}, str(root / f"{name}.safetensors"))
    t5 = T5EncoderModel.from_pretrained(pipe / "text_encoder_3").state_dict()
    save_file({k: v.contiguous() for k, v in t5.items() if k != "encoder.embed_tokens.weight"},
              str(root / "t5xxl_fp16.safetensors"))
    vae = AutoencoderKL.from_pretrained(pipe / "vae")
    levels = len(vae.config.block_out_channels)
    ldm = {}
    for key, tensor in vae.state_dict().items():
        name = diffusers_to_ldm_vae(key, levels)
        ldm[name] = tensor[:, :, None, None].contiguous() if is_attention_weight(name) else tensor.contiguous()
    save_file(ldm, str(root / "sd35_vae.safetensors"))
    with_vae = load_file(str(sd3["sai"])) | {f"first_stage_model.{k}": v for k, v in ldm.items()}
    save_file(with_vae, str(root / "sd35-tiny-with-vae.safetensors"))  # as SAI ships SD3.5: the VAE inside
    tokenizers = save_tiny_sd3(root / "tokenizers", parts=("tokenizer", "tokenizer_2", "tokenizer_3"))
    return {"clip_l": root / "clip_l.safetensors", "clip_g": root / "clip_g.safetensors",
            "t5": root / "t5xxl_fp16.safetensors", "vae": root / "sd35_vae.safetensors", "tokenizers": tokenizers,
            "sai_with_vae": root / "sd35-tiny-with-vae.safetensors"}


def lone_args(lone, *which: str, tokenizers: bool = True) -> list[str]:
    encoders = [str(lone[w]) for w in which if w != "vae"]
    vae = ["--vae", str(lone["vae"])] if "vae" in which else []
    return (["--text-encoders", *encoders] if encoders else []) + vae + (
        ["--pipeline", str(lone["tokenizers"])] if tokenizers else [])


def test_an_sai_file_with_lone_encoders_and_vae_renders_as_the_full_pipeline(sd3, dialects, lone, tmp_path, capsys,
                                                                            monkeypatch):
    """CLIP-L, CLIP-G and T5 files and an LDM VAE beside the SAI file give the effects of the full folder, with the
    files in either order (a LoRA on all three encoders: a CLIP in the wrong slot would not match); T5 left out, the
    conditioning uses zeros, as the folder without T5 does, and an SAI file holding its VAE needs no --vae;
    nothing is written to a temporary folder."""
    watched = watched_tempdir(tmp_path, monkeypatch)
    kohya, comfy = str(dialects["kohya"]), str(dialects["comfy"])  # kohya's has lora_te1..3, comfy's none
    folders = {}
    for lora, checkpoint, which, folder in ((kohya, sd3["sai"], ("clip_l", "clip_g", "t5", "vae"), "pipe"),
                                            (kohya, sd3["sai"], ("t5", "clip_g", "clip_l", "vae"), "pipe"),
                                            (comfy, lone["sai_with_vae"], ("clip_g", "clip_l"), "no_t5")):
        from_files = cli(["verify", lora, "--checkpoint", str(checkpoint), *lone_args(lone, *which), *SIZE,
                          "--json"], capsys, monkeypatch)
        if (lora, folder) not in folders:
            folders[lora, folder] = cli(["verify", lora, "--checkpoint", str(sd3[folder]), *SIZE, "--json"], capsys,
                                        monkeypatch)
        from_folder = folders[lora, folder]
        assert (from_files["verdict"], from_files["base"], from_files["parameters"]["shift"]) == ("pass", "sd35", 3.0)
        assert from_files["coverage"]["modules_hit"] == from_folder["coverage"]["modules_hit"], which
        for a, b in zip(from_files["effects"], from_folder["effects"], strict=True):
            assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-4), which
            assert a["mean_abs_pixel_change"] == pytest.approx(b["mean_abs_pixel_change"], rel=1e-4, abs=1e-4), which
    assert list(watched.iterdir()) == []


def test_sample_renders_an_sai_file_with_lone_parts(sd3, dialects, lone, tmp_path, capsys, monkeypatch):
    out = tmp_path / "lone.png"
    report = cli(["sample", "--checkpoint", str(sd3["sai"]), "--lora", str(dialects["kohya"]), "--prompt", "a fox",
                  *lone_args(lone, "clip_g", "clip_l", "t5", "vae"), "-o", str(out), *SIZE, "--json"], capsys,
                 monkeypatch)
    assert out.is_file() and report["base"] == "sd35" and report["warnings"] == []
    assert report["loras"][0]["modules_hit"] == report["loras"][0]["modules"] > 0



@pytest.fixture(scope="module")
def incl_clips(sd3, lone) -> Path:
    """The tiny pipeline as SAI ships `sd3_medium_incl_clips_t5xxlfp16.safetensors`: the MMDiT under
    `model.diffusion_model.`, each encoder under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`, the VAE in
    LDM names under `first_stage_model.`."""
    path = sd3["root"] / "sd35-tiny_incl_clips_t5xxlfp16.safetensors"
    tensors = load_file(str(lone["sai_with_vae"]))
    for name, part in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5")):
        tensors |= {f"text_encoders.{name}.transformer.{k}": v for k, v in load_file(str(lone[part])).items()}
    save_file(tensors, str(path))
    return path


def test_an_incl_clips_file_renders_with_its_own_encoders_and_vae(sd3, dialects, lone, incl_clips, tmp_path, capsys,
                                                                  monkeypatch):
    """No --text-encoders or --vae (--pipeline gives the three tokenizers alone: the tiny vocabulary is not CLIP's):
    CLIP-L and CLIP-G land in their slots (a kohya LoRA on all three encoders hits them all) and `sample` renders
    the very pixels the folder renders; a --text-encoders file still wins over the bundled one."""
    found = probe(incl_clips)
    assert (found.base, found.details["components"]) == ("sd35", ["transformer", "vae", "clip_g", "clip_l", "t5xxl"])
    lora, tokenizers = str(dialects["kohya"]), ["--pipeline", str(lone["tokenizers"])]
    result = cli(["verify", lora, "--checkpoint", str(incl_clips), *tokenizers, *SIZE, "--quick", "--json"], capsys,
                 monkeypatch)
    assert (result["verdict"], result["base"]) == ("pass", "sd35")
    assert result["coverage"]["modules_hit"] == result["coverage"]["modules_total"] > 0
    images = []
    for checkpoint, extra in ((incl_clips, tokenizers), (sd3["pipe"], [])):
        out = tmp_path / f"{checkpoint.stem}.png"
        cli(["sample", "--checkpoint", str(checkpoint), *extra, "--lora", lora, "--prompt", "a fox", "-o", str(out),
             *SIZE, "--json"], capsys, monkeypatch)
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(*images) and images[0].std() > 0
    clip_l = load_file(str(lone["clip_l"]))  # alone, the tiny width (none declared) takes the first slot: CLIP-L's
    clip_l["text_model.final_layer_norm.weight"] = clip_l["text_model.final_layer_norm.weight"] * 2
    save_file(clip_l, str(tmp_path / "clip_l.safetensors"))
    given = GivenParts(lone["tokenizers"], (tmp_path / "clip_l.safetensors",))
    pipe = load_for_sampling(incl_clips, "cpu", "fp32", given).pipe
    assert torch.equal(pipe.text_encoder.text_model.final_layer_norm.weight,
                       clip_l["text_model.final_layer_norm.weight"])


def test_two_clip_files_land_in_their_slots_in_either_order(sd3, lone, tmp_path):
    """CLIP-L (the narrower) in text_encoder, CLIP-G in text_encoder_2, by their widths alone; the VAE with SD3's
    latent factors, which no VAE file holds; a CLIP-L file without `text_projection.weight` (SAI's clip_l) gets the
    identity, as diffusers' single-file loader gives SD3's CLIP-L."""
    from adapterzoo.formats.model.registry import family_of
    from adapterzoo.verify.part_files import load_given

    family = family_of("sd35")
    for order in (("clip_l", "clip_g"), ("clip_g", "clip_l")):
        found, files = load_given(family, [lone[w] for w in order], lone["vae"], torch.float32)
        slots = {slot: path.stem for slot, path in files.items()}
        assert slots == {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}, order
        assert [found[s].config.hidden_size for s in ("text_encoder", "text_encoder_2")] == list(CLIP_WIDTHS)
    assert (found["vae"].config.scaling_factor, found["vae"].config.shift_factor) == (1.5305, 0.0609)
    bare = {k: v for k, v in load_file(str(lone["clip_l"])).items() if k != "text_projection.weight"}
    save_file(bare, str(tmp_path / "clip_l.safetensors"))
    found, files = load_given(family, [lone["clip_g"], tmp_path / "clip_l.safetensors"], None, torch.float32)
    assert files["text_encoder"] == tmp_path / "clip_l.safetensors"
    assert torch.equal(found["text_encoder"].text_projection.weight, torch.eye(CLIP_WIDTHS[0]))
    assert torch.equal(found["text_encoder"].text_model.final_layer_norm.weight,
                       bare["text_model.final_layer_norm.weight"])


@pytest.mark.parametrize("which, tokenizers, named", [
    (("clip_l", "clip_g", "t5"), True, "no vae (AutoencoderKL) for a SD3/SD3.5 pipeline"),
    (("clip_l", "vae"), True, "no text_encoder_2 (CLIPTextModelWithProjection) for a SD3/SD3.5 pipeline"),
    (("clip_l", "clip_g", "vae"), False, "clip_l.safetensors: a lone text-encoder file carries no tokenizer"),
    (("clip_l", "clip_g", "clip_l", "vae"), True, "clip_l.safetensors already gives text_encoder"),
])
def test_a_missing_part_is_one_line_naming_it(sd3, dialects, lone, which, tokenizers, named, capsys, monkeypatch):
    message = cli(["verify", str(dialects["kohya"]), "--checkpoint", str(sd3["sai"]),
                   *lone_args(lone, *which, tokenizers=tokenizers), *SIZE, "--json"], capsys, monkeypatch,
                  code=1)["error"]
    assert "\n" not in message and named in message, message
    if not tokenizers:
        assert "--pipeline DIR" in message and "tokenizer/" in message


def test_real_size_comfyui_clip_files_are_recognised_and_placed_by_width():
    """ComfyUI's clip_l (768) and clip_g (1280, 32 layers) at their real shapes (meta models, no weights): each a
    CLIPTextModelWithProjection, its `text_projection.weight` beside `text_model.`; the declared widths place them
    in either order; SD3's LDM VAE (16 latent channels) takes SD3's scaling and shift."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from adapterzoo.formats.checkpoint.part_files import recognise, vae_config
    from adapterzoo.formats.model.registry import family_of
    from adapterzoo.formats.model.vae_names import diffusers_to_ldm_vae
    from adapterzoo.verify.part_files import _assign_slots, _Given

    def clip_shapes(width: int, layers: int, act: str) -> dict[str, tuple[int, ...]]:
        with torch.device("meta"):
            model = CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act, projection_dim=width))
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    family = family_of("sd35")
    parts = {}
    for name, width, layers, act in (("clip_l", 768, 12, "quick_gelu"), ("clip_g", 1280, 32, "gelu")):
        shapes = clip_shapes(width, layers, act)
        assert "text_projection.weight" in shapes and "text_model.text_projection.weight" not in shapes
        part = recognise(shapes)
        assert (part.model_class, part.width, part.prefix) == ("CLIPTextModelWithProjection", width, "text_model.")
        assert (part.config["projection_dim"], part.config["num_hidden_layers"], part.config["hidden_act"],
                part.config["num_attention_heads"]) == (width, layers, act, width // 64)
        parts[name] = part
    given = {name: _Given(Path(f"{name}.safetensors"), part.model_class, part.width, part)
             for name, part in parts.items()}
    assert _assign_slots(family, [given["clip_g"], given["clip_l"]]) == ["text_encoder_2", "text_encoder"]
    assert _assign_slots(family, [given["clip_l"], given["clip_g"]]) == ["text_encoder", "text_encoder_2"]
    # SAI's clip_l has no projection: a CLIPTextModel, still CLIP-L's slot by its width
    shapes = {k: v for k, v in clip_shapes(768, 12, "quick_gelu").items() if k != "text_projection.weight"}
    part = recognise(shapes)
    assert (part.model_class, part.width) == ("CLIPTextModel", 768)
    bare = _Given(Path("clip_l.safetensors"), part.model_class, part.width, part)
    assert _assign_slots(family, [given["clip_g"], bare]) == ["text_encoder_2", "text_encoder"]
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    with torch.device("meta"):
        ae = {diffusers_to_ldm_vae(k, 4): tuple(v.shape) for k, v in AutoencoderKL(**vae).state_dict().items()}
    part = recognise(ae)
    config = vae_config(part, ae, 1024, family.sampling.vae_config)
    assert {k: config[k] for k in vae} == vae
    assert (config["scaling_factor"], config["shift_factor"]) == (1.5305, 0.0609)


# -- textual-inversion embeddings: each slot on its own encoder (CLIP-L, CLIP-G, T5) ---------------------------

EMBEDDING_SLOTS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
EMBEDDING_WIDTHS = {"clip_l": CLIP_WIDTHS[0], "clip_g": CLIP_WIDTHS[1], "t5xxl": T5_WIDTH}


@pytest.fixture(scope="module")
def embeddings(sd3) -> dict[str, Path]:
    from embedding_helpers import slot_embedding

    root = sd3["root"]
    return {"all": slot_embedding(root / "sd3style.safetensors", EMBEDDING_WIDTHS, vectors=4, scale=3.0),
            "t5": slot_embedding(root / "t5style.safetensors", {"t5xxl": T5_WIDTH}, vectors=16, seed=1, scale=10.0)}


def test_an_embedding_acts_on_clip_l_clip_g_and_t5_each_through_its_own_tokens(sd3, embeddings, capsys,
                                                                              monkeypatch):
    """The three slots each on their encoder, full coverage; a T5-only file (probed as Flux's: the same T5-XXL)
    fits SD3.5 and acts through T5 alone."""
    for which, slots in (("all", 3), ("t5", 1)):
        result = cli(["verify", str(embeddings[which]), "--checkpoint", str(sd3["pipe"]), *SIZE, "--json"], capsys,
                     monkeypatch)
        assert_passes_fully(result, which)
        assert result["coverage"]["modules_total"] == slots  # every slot applied, on its encoder


def test_a_t5_slot_without_t5_in_the_pipeline_is_one_unmatched_key(sd3, embeddings, capsys, monkeypatch):
    result = cli(["verify", str(embeddings["all"]), "--checkpoint", str(sd3["no_t5"]), *SIZE, "--json"], capsys,
                 monkeypatch, code=1)
    coverage = result["coverage"]
    assert (coverage["keys_total"], coverage["keys_matched"], coverage["modules_hit"]) == (3, 2, 2)
    assert coverage["unmatched"] == ["t5xxl (the pipeline has no text_encoder_3: its t5xxl vectors act on nothing)"]
    assert result["reasons"] == ["1 key(s) land on no module of the checkpoint: t5xxl (the pipeline has no "
                                 "text_encoder_3: its t5xxl vectors act on nothing)"]
    assert result["effects"][0]["noise_pred_rel_change"] == 0 and result["effects"][2]["noise_pred_rel_change"] > 0


def test_embedding_vectors_equal_added_tokens_in_each_tokenizer(sd3, embeddings):
    """The prompt's encoding with the vectors hooked in equals plain transformers: each of the three tokenizers
    extended by the tokens (add_tokens, resize_token_embeddings, rows set to the vectors); a T5-only file leaves
    both CLIPs' states and pooled outputs as the prompt without the token gives them."""
    from embedding_helpers import reference_conditioning

    from adapterzoo.formats.embedding_convert import read_embedding

    loaded = load_for_sampling(sd3["pipe"], "cpu", "fp32")
    pipe = loaded.pipe
    for which in ("all", "t5"):
        path = embeddings[which]
        prompt = f"a photo of {path.stem}, in the snow"
        parts = read_embedding(path)[0].parts
        attached = attach(path, probe(path), loaded)
        handle = attached.hook()
        try:
            got = denoise.encode_prompt(pipe, prompt, attached.insert())
        finally:
            attached.remove()
        slots = {slot: EMBEDDING_SLOTS[slot] for slot in parts}
        states, added = reference_conditioning(pipe, slots, parts, path.stem, prompt)
        assert handle.calls == {name: 1 for name in slots.values()}
        assert torch.allclose(got.states, states, atol=1e-5, rtol=0), which
        assert torch.allclose(got.added["pooled"], added["pooled"], atol=1e-5, rtol=0), which
        bare = denoise.encode_prompt(pipe, attached.without(prompt))
        clip_tokens = pipe.tokenizer.model_max_length
        assert torch.equal(got.states[:, :clip_tokens], bare.states[:, :clip_tokens]) == (which == "t5")
        assert torch.equal(got.added["pooled"], bare.added["pooled"]) == (which == "t5")
        assert (got.states[:, clip_tokens:] - bare.states[:, clip_tokens:]).abs().max() > 1e-3


def test_sample_takes_embeddings_and_names_a_t5_slot_without_t5_in_one_line(sd3, embeddings, tmp_path, capsys,
                                                                              monkeypatch):
    every, t5 = embeddings["all"], embeddings["t5"]
    out = tmp_path / "out.png"
    report = cli(["sample", "--checkpoint", str(sd3["pipe"]), "--embedding", str(every), "--embedding", str(t5),
                  "--prompt", f"a photo of {every.stem}", "--negative-prompt", t5.stem, "-o", str(out), *SIZE,
                  "--json"], capsys, monkeypatch)
    assert out.is_file() and report["warnings"] == []
    assert [(e["slots"], e["slots_hit"]) for e in report["embeddings"]] == [(3, 3), (1, 1)]  # the negative too
    message = cli(["sample", "--checkpoint", str(sd3["no_t5"]), "--embedding", str(every), "--prompt",
                   f"a photo of {every.stem}", "-o", str(tmp_path / "no_t5.png"), *SIZE, "--json"], capsys,
                  monkeypatch, code=1)["error"]
    assert message == (f"{every.name}: 1 of 3 key(s) land on no module of the checkpoint: t5xxl (the pipeline has no "
                       "text_encoder_3: its t5xxl vectors act on nothing) (--allow-unmatched samples with the rest)")
    report = cli(["sample", "--checkpoint", str(sd3["no_t5"]), "--embedding", str(every), "--prompt",
                  f"a photo of {every.stem}", "-o", str(tmp_path / "no_t5.png"), *SIZE, "--allow-unmatched",
                  "--json"], capsys, monkeypatch)
    assert [(e["slots"], e["slots_hit"], len(e["unmatched"])) for e in report["embeddings"]] == [(2, 2, 1)]
