"""Flux.1 in verify and sample (issue 15 §1): tiny dev/schnell pipelines built from diffusers classes, loaded as
a full folder, a BFL single file (in memory, no temporary folder) or a transformer-only folder, the parts it lacks
from --pipeline or from lone files (--text-encoders, --vae); every LoRA dialect probe reads for Flux, LyCORIS
LoKr/LoHa included; run-time result against diffusers' own Flux LoRA loader and against ΔW; dev's distilled
guidance and schnell's 4 steps as recorded; --quick; a Flux checkpoint verified as the file itself."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from dit_verify import assert_passes_fully, assert_run_time_equals, cli, prediction, watched_tempdir
from flux_tiny import save_lone_ae, save_lone_t5, save_tiny_flux
from PIL import Image
from safetensors.torch import load_file, save_file

from adapterzoo.formats.probe import probe
from adapterzoo.verify.attach import attach
from adapterzoo.verify.denoise import Conditioning
from adapterzoo.verify.pipeline_load import load_for_sampling

SIZE = ["--size", "32x32", "--steps", "2"]
INNER = 32  # heads × head_dim of the tiny transformer
MLP = 4 * INNER
TARGETS = {  # diffusers module -> (in, out) of the tiny transformer
    "transformer_blocks.0.attn.to_q": (INNER, INNER), "transformer_blocks.0.attn.add_k_proj": (INNER, INNER),
    "transformer_blocks.0.ff.net.0.proj": (INNER, MLP), "single_transformer_blocks.0.attn.to_v": (INNER, INNER),
    "single_transformer_blocks.0.proj_out": (INNER + MLP, INNER),
}


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    """The tiny dev pipeline as a folder, as a BFL single file, as a transformer-only folder, and its other parts."""
    root = tmp_path_factory.mktemp("flux")
    folder = save_tiny_flux(root / "pipe")
    parts = save_tiny_flux(root / "parts", parts=("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                  "tokenizer_2", "scheduler"))
    transformer_only = save_tiny_flux(root / "transformer_only", parts=("transformer",))
    from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint

    convert_checkpoint(folder, root / "flux1-tiny.safetensors", "ldm")
    return {"pipe": folder, "parts": parts, "bfl": root / "flux1-tiny.safetensors",
            "transformer_only": transformer_only, "root": root}


def diffusers_lora(path: Path, zero_up: bool = False, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (i, o) in TARGETS.items():
        sd[f"transformer.{module}.lora_A.weight"] = torch.randn(4, i, generator=gen) * 0.3
        sd[f"transformer.{module}.lora_B.weight"] = torch.zeros(o, 4) if zero_up else torch.randn(o, 4, generator=gen) * 0.3
    save_file(sd, str(path))
    return path


def xlabs_lora(path: Path) -> Path:
    """XLabs processor slots: qkv_lora1 on the image stream's fused qkv, proj_lora2 on the text stream's out."""
    gen = torch.Generator().manual_seed(5)
    sd = {"double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(4, INNER, generator=gen) * 0.3,
          "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(3 * INNER, 4, generator=gen) * 0.3,
          "double_blocks.0.processor.proj_lora2.down.weight": torch.randn(4, INNER, generator=gen) * 0.3,
          "double_blocks.0.processor.proj_lora2.up.weight": torch.randn(INNER, 4, generator=gen) * 0.3}
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def dialects(flux, tmp_path_factory) -> dict[str, Path]:
    """One LoRA in each dialect probe reads for Flux; kohya, BFL and PEFT written by our converter."""
    from adapterzoo.formats.convert import convert

    root = tmp_path_factory.mktemp("loras")
    files = {"diffusers": diffusers_lora(root / "diffusers.safetensors"), "xlabs": xlabs_lora(root / "xlabs.safetensors")}
    for to, name in (("kohya", "kohya.safetensors"), ("bfl", "bfl.safetensors"), ("peft", "peft")):
        convert(files["diffusers"], root / name, to, checkpoint=flux["pipe"])
        files[to] = root / name
    return files


def test_every_dialect_passes_on_the_full_pipeline_and_zero_is_the_bare_model(flux, dialects, capsys, monkeypatch):
    for dialect, path in dialects.items():
        assert probe(path).base == "flux", dialect
        result = cli(["verify", str(path), "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
        assert_passes_fully(result, dialect)


def test_a_zero_up_lora_fails_no_effect(flux, tmp_path, capsys, monkeypatch):
    path = diffusers_lora(tmp_path / "zero.safetensors", zero_up=True)
    result = cli(["verify", str(path), "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch,
                 code=1)
    assert (result["verdict"], result["reasons"]) == ("fail", ["no effect: every lora_up is zero"])


def _inputs() -> tuple[torch.Tensor, Conditioning]:
    """A fixed latent and text condition of the tiny Flux's widths."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=gen)
    return x, Conditioning(torch.randn(1, 7, 32, generator=gen), {"pooled": torch.randn(1, 768, generator=gen)})


@pytest.mark.parametrize("dialect", ["diffusers", "kohya", "bfl", "peft"])
def test_run_time_equals_diffusers_load_lora_into_transformer(flux, dialects, dialect):
    """diffusers' kohya/BFL/XLabs converters hard-code Flux's real width (3072), so the tiny model's reference is
    diffusers loading the diffusers file the other dialects were converted from."""
    loaded = load_for_sampling(flux["pipe"], "cpu", "fp32")
    reference = copy.deepcopy(loaded.pipe.transformer)
    state_dict, alphas = FluxPipeline.lora_state_dict(str(dialects["diffusers"]), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=reference)
    assert_run_time_equals(loaded, dialects[dialect], reference, *_inputs())


def test_a_bfl_file_loads_in_memory_with_the_pipelines_parts(flux, dialects, tmp_path, capsys, monkeypatch):
    watched = watched_tempdir(tmp_path, monkeypatch)
    lora = str(dialects["kohya"])
    message = cli(["verify", lora, "--checkpoint", str(flux["bfl"]), *SIZE, "--json"], capsys, monkeypatch,
                  code=1)["error"]
    assert "\n" not in message and "no vae (AutoencoderKL), text_encoder (CLIPTextModel)" in message and "--pipeline" in message
    from_file = cli(["verify", lora, "--checkpoint", str(flux["bfl"]), "--pipeline", str(flux["parts"]), *SIZE,
                     "--json"], capsys, monkeypatch)
    from_folder = cli(["verify", lora, "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert from_file["verdict"] == "pass" and from_file["base"] == "flux"
    for a, b in zip(from_file["effects"], from_folder["effects"]):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4)
    assert list(watched.iterdir()) == []


def test_a_transformer_only_folder_takes_the_rest_from_pipeline(flux, dialects, capsys, monkeypatch):
    result = cli(["verify", str(dialects["bfl"]), "--checkpoint", str(flux["transformer_only"]),
                  "--pipeline", str(flux["parts"]), *SIZE, "--json"], capsys, monkeypatch)
    assert result["verdict"] == "pass"


def test_sample_renders_a_bfl_file_with_two_loras(flux, dialects, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.png"
    report = cli(["sample", "--checkpoint", str(flux["bfl"]), "--pipeline", str(flux["parts"]),
                  "--lora", f"{dialects['kohya']}:0.7", "--lora", str(dialects["xlabs"]), "--prompt", "a red fox",
                  "-o", str(out), *SIZE, "--json"], capsys, monkeypatch)
    assert out.is_file() and report["base"] == "flux" and report["warnings"] == []
    assert all(lora["modules_hit"] == lora["modules"] > 0 for lora in report["loras"])


# -- parts from lone files (--text-encoders, --vae), guidance, steps, sizes, LyCORIS, --quick ----------------------


@pytest.fixture(scope="module")
def lone(flux) -> dict[str, Path]:
    """The tiny pipeline's CLIP, T5 and VAE as the single files ComfyUI users keep: clip_l in CLIPTextModel names
    with `text_model.`, t5xxl in T5EncoderModel's encoder names with the embedding once (`shared.weight`), ae in
    BFL's original (LDM) VAE names, attention as 1x1 convs; and a folder holding only the two tokenizers."""
    from transformers import CLIPTextModel

    root, pipe = flux["root"], flux["pipe"]
    clip = CLIPTextModel.from_pretrained(pipe / "text_encoder").state_dict()
    save_file({f"text_model.{k}": v.contiguous() for k, v in clip.items()}, str(root / "clip_l.safetensors"))
    tokenizers = save_tiny_flux(root / "tokenizers", parts=("tokenizer", "tokenizer_2"))
    return {"clip": root / "clip_l.safetensors", "tokenizers": tokenizers,
            "t5": save_lone_t5(pipe / "text_encoder_2", root / "t5xxl_fp16.safetensors"),
            "ae": save_lone_ae(pipe / "vae", root / "ae.safetensors")}


def lone_args(lone, *which: str) -> list[str]:
    return ["--text-encoders", *(str(lone[w]) for w in which if w != "ae"), *(["--vae", str(lone["ae"])]
                                                                               if "ae" in which else [])]


def test_a_bfl_file_with_lone_text_encoders_and_vae_renders_as_the_full_pipeline(flux, dialects, lone, tmp_path,
                                                                                 capsys, monkeypatch):
    watched = watched_tempdir(tmp_path, monkeypatch)
    lora = str(dialects["kohya"])
    from_files = cli(["verify", lora, "--checkpoint", str(flux["bfl"]), *lone_args(lone, "clip", "t5", "ae"),
                      "--pipeline", str(lone["tokenizers"]), *SIZE, "--json"], capsys, monkeypatch)
    from_folder = cli(["verify", lora, "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert (from_files["verdict"], from_files["base"]) == ("pass", "flux")
    for a, b in zip(from_files["effects"], from_folder["effects"], strict=True):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-4)
        assert a["mean_abs_pixel_change"] == pytest.approx(b["mean_abs_pixel_change"], rel=1e-4, abs=1e-4)
    assert list(watched.iterdir()) == []


@pytest.mark.parametrize("which, extra, named", [
    (("clip", "ae"), True, "no text_encoder_2 (T5EncoderModel) for a Flux pipeline"),
    (("clip", "t5"), True, "no vae (AutoencoderKL) for a Flux pipeline"),
    (("clip", "t5", "ae"), False, "a lone text-encoder file carries no tokenizer"),
])
def test_a_missing_part_is_one_line_naming_it(flux, dialects, lone, which, extra, named, capsys, monkeypatch):
    args = ["verify", str(dialects["kohya"]), "--checkpoint", str(flux["bfl"]), *lone_args(lone, *which), *SIZE,
            "--json"] + (["--pipeline", str(lone["tokenizers"])] if extra else [])
    message = cli(args, capsys, monkeypatch, code=1)["error"]
    assert "\n" not in message and named in message, message
    if not extra:
        assert "clip_l.safetensors" in message and "--pipeline DIR" in message and "tokenizer/" in message


def test_text_encoders_refuse_what_is_not_one_in_one_line(flux, dialects, lone, capsys, monkeypatch):
    for given, named in ((lone["ae"], "it is a AutoencoderKL vae; give it with --vae"),
                         (dialects["kohya"], "not a text encoder")):
        message = cli(["verify", str(dialects["kohya"]), "--checkpoint", str(flux["bfl"]), "--text-encoders",
                       str(given), *SIZE, "--json"], capsys, monkeypatch, code=1)["error"]
        assert "\n" not in message and named in message, message
    message = cli(["verify", str(dialects["kohya"]), "--checkpoint", str(flux["bfl"]), "--text-encoders",
                   str(lone["clip"]), str(lone["clip"]), *SIZE, "--json"], capsys, monkeypatch, code=1)["error"]
    assert "already gives text_encoder" in message


def kohya_with_clip(path: Path, kohya: Path) -> Path:
    """The kohya Flux LoRA plus a CLIP-L layer (`lora_te1_`), as sd-scripts writes with --network_train_text_encoder."""
    gen = torch.Generator().manual_seed(9)
    sd = load_file(str(kohya))
    for proj in ("q_proj", "v_proj"):
        stem = f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}"
        sd |= {f"{stem}.lora_down.weight": torch.randn(4, 768, generator=gen) * 0.3,
               f"{stem}.lora_up.weight": torch.randn(768, 4, generator=gen) * 0.3, f"{stem}.alpha": torch.tensor(4.0)}
    save_file(sd, str(path))
    return path


def test_a_kohya_lora_with_clip_hits_the_lone_clip_of_a_transformer_only_checkpoint(flux, dialects, lone, tmp_path,
                                                                                    capsys, monkeypatch):
    lora = kohya_with_clip(tmp_path / "with_clip.safetensors", dialects["kohya"])
    result = cli(["verify", str(lora), "--checkpoint", str(flux["transformer_only"]),
                  *lone_args(lone, "clip", "t5", "ae"), "--pipeline", str(lone["tokenizers"]), *SIZE, "--json"],
                 capsys, monkeypatch)
    coverage = result["coverage"]
    assert result["verdict"] == "pass" and coverage["keys_matched"] == coverage["keys_total"]
    assert coverage["modules_hit"] == coverage["modules_total"]  # the two CLIP modules ran in the lone CLIP
    clip_only = cli(["verify", str(lora), "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert coverage["modules_total"] == clip_only["coverage"]["modules_total"]
    for a, b in zip(result["effects"], clip_only["effects"], strict=True):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-4)


def test_dev_records_its_distilled_guidance_and_no_cfg(flux, dialects, tmp_path, capsys, monkeypatch):
    from PIL import Image

    grid = tmp_path / "grid.png"
    result = cli(["verify", str(dialects["diffusers"]), "--checkpoint", str(flux["pipe"]), *SIZE, "-o", str(grid),
                  "--json"], capsys, monkeypatch)
    parameters = result["parameters"]
    assert parameters["distilled_guidance"] == 3.5 and parameters["steps"] == 2
    assert "cfg_scale" not in parameters and "negative_prompt" not in parameters
    text = Image.open(grid).text["parameters"]
    assert "Distilled guidance: 3.5" in text and "CFG scale" not in text
    out = tmp_path / "sample.png"
    report = cli(["sample", "--checkpoint", str(flux["pipe"]), "--lora", str(dialects["diffusers"]), "--prompt",
                  "a red fox", "-o", str(out), *SIZE, "--json"], capsys, monkeypatch)
    assert report["distilled_guidance"] == 3.5 and "negative_prompt" not in report
    text = Image.open(out).text["parameters"]
    assert "Distilled guidance: 3.5" in text and "CFG scale" not in text and "Negative prompt" not in text
    message = cli(["sample", "--checkpoint", str(flux["pipe"]), "--lora", str(dialects["diffusers"]), "--prompt",
                   "a red fox", "--negative-prompt", "blurry", "-o", str(tmp_path / "n.png"), *SIZE, "--json"],
                  capsys, monkeypatch, code=1)["error"]
    assert "--negative-prompt" in message and "without classifier-free guidance" in message


def test_schnell_takes_4_steps_and_records_no_guidance(tmp_path, dialects, capsys, monkeypatch):
    folder = save_tiny_flux(tmp_path / "schnell", guidance=False)
    result = cli(["verify", str(dialects["diffusers"]), "--checkpoint", str(folder), "--size", "32x32", "--json"],
                 capsys, monkeypatch)
    parameters = result["parameters"]
    assert result["verdict"] == "pass" and parameters["steps"] == 4 and parameters["guidance"] == "none"
    assert "cfg_scale" not in parameters and "distilled_guidance" not in parameters
    report = cli(["sample", "--checkpoint", str(folder), "--lora", str(dialects["diffusers"]), "--prompt", "a fox",
                  "-o", str(tmp_path / "s.png"), "--size", "32x32", "--json"], capsys, monkeypatch)
    assert report["steps"] == 4 and report["guidance"] == "none"


def test_a_size_not_a_multiple_of_16_is_refused_saying_why(flux, dialects, tmp_path, capsys, monkeypatch):
    """The tiny VAE halves once (factor 2, so sizes step by 4); Flux's real VAE (four levels, factor 8) steps by 16."""
    from types import SimpleNamespace

    from adapterzoo.errors import AdapterzooError
    from adapterzoo.formats.families.flux.sampling import FluxDenoiser
    from adapterzoo.verify.verifier import check_size

    for command in (["verify", str(dialects["diffusers"])], ["sample", "--lora", str(dialects["diffusers"]),
                                                            "--prompt", "a fox", "-o", str(tmp_path / "x.png")]):
        message = cli([*command, "--checkpoint", str(flux["pipe"]), "--size", "34x32", "--steps", "1", "--json"],
                      capsys, monkeypatch, code=1)["error"]
        assert message == ("--size 34x32: the size must be a multiple of 4 for flux: latents are packed in 2x2 "
                           "patches (VAE factor 2 x 2)")
    real = SimpleNamespace(pipe=SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(
        block_out_channels=(128, 256, 512, 512))), unet=FluxDenoiser), base="flux")
    check_size(real, (1024, 768))
    with pytest.raises(AdapterzooError, match=r"^--size 1000x1000: the size must be a multiple of 16 for flux: "
                                              r"latents are packed in 2x2 patches \(VAE factor 8 x 2\)$"):
        check_size(real, (1000, 1000))


def test_a_lone_clip_l_file_of_real_vocabulary_gets_the_clip_tokenizer_adapterzoo_ships():
    """ComfyUI's clip_l.safetensors carries no tokenizer: CLIP's vocabulary ships with adapterzoo (checked on a
    meta CLIP-L, no weights); T5's does not, so a lone T5 file needs --pipeline DIR."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from adapterzoo.formats.model.registry import family_of
    from adapterzoo.verify.part_files import builtin_tokenizer

    family = family_of("flux")
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, num_hidden_layers=1))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=64, num_layers=1))
    tokenizer = builtin_tokenizer(family, "text_encoder", clip)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert builtin_tokenizer(family, "text_encoder_2", t5) is None


def test_quick_judges_coverage_and_effect_without_a_grid(flux, dialects, tmp_path, capsys, monkeypatch):
    result = cli(["verify", str(dialects["kohya"]), "--checkpoint", str(flux["bfl"]), "--pipeline", str(flux["parts"]),
                  "--quick", *SIZE, "--json"], capsys, monkeypatch)
    assert (result["verdict"], result["quick"], result["grid"]) == ("pass", True, None)
    coverage = result["coverage"]
    assert coverage["modules_hit"] == coverage["modules_total"] > 0
    zero, *rest = result["effects"]
    assert zero["noise_pred_rel_change"] == 0 and all(e["noise_pred_rel_change"] > 1e-3 for e in rest)
    assert all(e["mean_abs_pixel_change"] is None for e in result["effects"])  # nothing decoded
    zero_up = diffusers_lora(tmp_path / "zero.safetensors", zero_up=True)
    failed = cli(["verify", str(zero_up), "--checkpoint", str(flux["pipe"]), "--quick", *SIZE, "--json"], capsys,
                 monkeypatch, code=1)
    assert failed["reasons"] == ["no effect: every lora_up is zero"]


# BFL module -> diffusers modules and their rows, for the LyCORIS files below
LYCORIS_TARGETS = {"double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", 0, INNER),
                                                    ("transformer_blocks.0.attn.to_k", INNER, 2 * INNER),
                                                    ("transformer_blocks.0.attn.to_v", 2 * INNER, 3 * INNER)],
                   "single_blocks.0.linear2": [("single_transformer_blocks.0.proj_out", 0, INNER)]}


def lycoris(path: Path, algo: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """LoKr in kohya names (`lora_unet_`, as LyCORIS writes for Flux), LoHa in BFL names (`diffusion_model.`), on
    the fused qkv and on linear2; returns the file and ΔW per BFL module (float64, alpha/rank applied)."""
    gen = torch.Generator().manual_seed(11)
    sd, deltas = {}, {}
    for name, (out, inp) in (("double_blocks.0.img_attn.qkv", (3 * INNER, INNER)),
                             ("single_blocks.0.linear2", (INNER, INNER + MLP))):
        if algo == "lokr":
            stem = "lora_unet_" + name.replace(".", "_")
            w1, w2 = torch.randn(4, 4, generator=gen) * 0.3, torch.randn(out // 4, inp // 4, generator=gen) * 0.3
            sd |= {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2, f"{stem}.alpha": torch.tensor(1.0)}
            deltas[name] = torch.kron(w1.double(), w2.double())
        else:
            stem = f"diffusion_model.{name}"
            a = [torch.randn(out, 4, generator=gen) * 0.3 for _ in range(2)]
            b = [torch.randn(4, inp, generator=gen) * 0.3 for _ in range(2)]
            sd |= {f"{stem}.hada_w1_a": a[0], f"{stem}.hada_w1_b": b[0], f"{stem}.hada_w2_a": a[1],
                   f"{stem}.hada_w2_b": b[1], f"{stem}.alpha": torch.tensor(2.0)}
            deltas[name] = (a[0].double() @ b[0].double()) * (a[1].double() @ b[1].double()) * 2.0 / 4
    save_file(sd, str(path))
    return path, deltas


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_lycoris_lokr_and_loha_verify_and_apply_their_delta(flux, tmp_path, algo, capsys, monkeypatch):
    path, deltas = lycoris(tmp_path / f"{algo}.safetensors", algo)
    found = probe(path)
    assert (found.kind, found.base) == ("lycoris", "flux")
    result = cli(["verify", str(path), "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert (result["verdict"], result["reasons"]) == ("pass", [])
    coverage = result["coverage"]
    assert coverage["keys_matched"] == coverage["keys_total"] and coverage["modules_hit"] == coverage["modules_total"]
    assert result["effects"][0]["noise_pred_rel_change"] == 0
    loaded = load_for_sampling(flux["pipe"], "cpu", "fp32")  # the hooks against ΔW added to a copy's weights
    merged = copy.deepcopy(loaded.pipe.transformer)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, parts in LYCORIS_TARGETS.items():
            for module, lo, hi in parts:
                modules[module].weight += deltas[name][lo:hi].float()
    expected = prediction(loaded, *_inputs(), merged)
    attached = attach(path, found, loaded)
    attached.hook()
    try:
        got = prediction(loaded, *_inputs())
    finally:
        attached.remove()
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_a_flux_checkpoint_verifies_as_the_file_itself(flux, capsys, monkeypatch):
    """A BFL file given as FILE renders alone, its missing parts from the same --pipeline as the checkpoint's."""
    result = cli(["verify", str(flux["bfl"]), "--checkpoint", str(flux["pipe"]), "--pipeline", str(flux["parts"]),
                  *SIZE, "--json"], capsys, monkeypatch)
    assert (result["verdict"], result["kind"], result["base"], result["reasons"]) == ("pass", "checkpoint", "flux", [])


def test_real_size_lone_files_are_recognised_with_their_configs_from_shapes():
    """ComfyUI's clip_l and t5xxl_fp16 and BFL's ae at their real shapes (from meta models: no weights): each is
    recognised as its part, with the config it was made with read back from the shapes alone."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from adapterzoo.formats.checkpoint.part_files import recognise, vae_config
    from adapterzoo.formats.model.registry import family_of
    from adapterzoo.formats.model.vae_names import diffusers_to_ldm_vae

    def shapes(model, rename=lambda k: k):
        return {rename(k): tuple(v.shape) for k, v in model.state_dict().items()}

    clip_config = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    t5_config = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     feed_forward_proj="gated-gelu")
    vae = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    with torch.device("meta"):
        clip = shapes(CLIPTextModel(CLIPTextConfig(**clip_config)), lambda k: f"text_model.{k}")
        t5 = shapes(T5EncoderModel(T5Config(**t5_config)))
        ae = shapes(AutoencoderKL(**vae), lambda k: diffusers_to_ldm_vae(k, 4))
    t5.pop("encoder.embed_tokens.weight")
    part = recognise(clip)
    assert (part.model_class, part.width, part.prefix) == ("CLIPTextModel", 768, "text_model.")
    assert {k: part.config[k] for k in clip_config} == clip_config
    part = recognise(t5)
    assert (part.model_class, part.width) == ("T5EncoderModel", 4096)
    assert {k: part.config[k] for k in t5_config} == t5_config
    part = recognise(ae)
    assert (part.kind, part.ldm) == ("vae", True)
    config = vae_config(part, ae, 1024, family_of("flux").sampling.vae_config)
    assert {k: config[k] for k in vae} == vae
    assert (config["scaling_factor"], config["shift_factor"]) == (0.3611, 0.1159)


def test_parts_for_a_whole_pipeline_are_refused_in_one_line(lone, dialects, tmp_path, capsys, monkeypatch):
    from adapterzoo.tiny_models import save_tiny_pipeline

    sd1 = save_tiny_pipeline("sd1", tmp_path / "sd1")
    for command in (["verify", str(dialects["diffusers"])],
                    ["sample", "--lora", str(dialects["diffusers"]), "--prompt", "a fox", "-o", str(tmp_path / "x.png")]):
        message = cli([*command, "--checkpoint", str(sd1), "--vae", str(lone["ae"]), "--json"], capsys, monkeypatch,
                      code=1)["error"]
        assert message == ("--text-encoders and --vae give the parts a transformer-only checkpoint lacks; sd1 holds "
                           "its own (verify a VAE file as FILE instead)")


def test_a_lone_scaled_fp8_t5_is_dequantized_as_comfyui_stores_it(flux, lone, tmp_path):
    """t5xxl_fp8_e4m3fn_scaled: fp8 weights, a `scale_weight` beside each, a `scaled_fp8` marker; loaded as W × s."""
    from adapterzoo.formats.model.registry import family_of
    from adapterzoo.verify.part_files import load_given

    sd, expected = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, tensor in load_file(str(lone["t5"])).items():
        if key.endswith(".weight") and tensor.dim() == 2 and key != "shared.weight":
            scale = tensor.abs().max() / 448
            sd[key] = (tensor / scale).to(torch.float8_e4m3fn)
            sd[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            expected[key] = sd[key].float() * scale
        else:
            sd[key] = expected[key] = tensor
    save_file(sd, str(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"))
    found, lone_files = load_given(family_of("flux"), [tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"], None,
                                   torch.float32)
    assert list(lone_files) == ["text_encoder_2"]
    state = found["text_encoder_2"].state_dict()
    assert all(torch.equal(state[key], value) for key, value in expected.items())


def test_diffusers_component_folders_give_the_parts_and_their_tokenizers(flux, dialects, capsys, monkeypatch):
    """text_encoder/ and text_encoder_2/ folders (tokenizers from the tokenizer*/ folders beside them) and vae/:
    no --pipeline needed; the FILE may come after the list's end (the next option)."""
    pipe = flux["pipe"]
    result = cli(["verify", "--checkpoint", str(flux["bfl"]), "--text-encoders", str(pipe / "text_encoder_2"),
                  str(pipe / "text_encoder"), "--vae", str(pipe / "vae"), str(dialects["kohya"]), *SIZE, "--json"],
                 capsys, monkeypatch)
    full = cli(["verify", str(dialects["kohya"]), "--checkpoint", str(pipe), *SIZE, "--json"], capsys, monkeypatch)
    assert result["verdict"] == "pass"
    for a, b in zip(result["effects"], full["effects"], strict=True):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4, abs=1e-4)


def test_sample_renders_a_bfl_file_with_lone_parts(flux, dialects, lone, tmp_path, capsys, monkeypatch):
    out = tmp_path / "lone.png"
    report = cli(["sample", "--checkpoint", str(flux["bfl"]), "--lora", str(dialects["kohya"]), "--prompt", "a fox",
                  *lone_args(lone, "clip", "t5", "ae"), "--pipeline", str(lone["tokenizers"]), "-o", str(out), *SIZE,
                  "--json"], capsys, monkeypatch)
    assert out.is_file() and report["base"] == "flux" and report["loras"][0]["modules_hit"] > 0



@pytest.fixture(scope="module")
def all_in_one(flux, lone) -> Path:
    """The tiny pipeline as ComfyUI saves a full Flux.1 checkpoint (flux1-dev-fp8.safetensors): the transformer under
    `model.diffusion_model.`, CLIP-L and T5 under `text_encoders.clip_l.transformer.` and
    `text_encoders.t5xxl.transformer.`, the VAE in LDM names under `vae.`."""
    path = flux["root"] / "flux1-tiny-aio.safetensors"
    tensors = {f"model.diffusion_model.{k}": v for k, v in load_file(str(flux["bfl"])).items()}
    for prefix, part in (("text_encoders.clip_l.transformer.", "clip"), ("text_encoders.t5xxl.transformer.", "t5"),
                         ("vae.", "ae")):
        tensors |= {prefix + k: v for k, v in load_file(str(lone[part])).items()}
    save_file(tensors, str(path))
    return path


def test_a_comfyui_full_checkpoint_renders_with_its_own_encoders_and_vae(flux, dialects, lone, all_in_one, tmp_path,
                                                                         capsys, monkeypatch):
    """No --text-encoders or --vae: the bundled CLIP-L, T5 and VAE load in memory (the --pipeline folder holds the
    two tokenizers only, as the tiny vocabulary is not CLIP's); `sample` renders the very pixels the folder renders."""
    watched = watched_tempdir(tmp_path, monkeypatch)
    found = probe(all_in_one)
    assert (found.base, found.details["components"]) == ("flux", ["transformer", "vae", "clip_l", "t5xxl"])
    lora, tokenizers = str(dialects["kohya"]), ["--pipeline", str(lone["tokenizers"])]
    message = cli(["verify", lora, "--checkpoint", str(all_in_one), *SIZE, "--json"], capsys, monkeypatch,
                  code=1)["error"]
    assert message.startswith("flux1-tiny-aio.safetensors: the text_encoder it bundles carries no tokenizer")
    result = cli(["verify", lora, "--checkpoint", str(all_in_one), *tokenizers, *SIZE, "--json"], capsys, monkeypatch)
    assert (result["verdict"], result["base"]) == ("pass", "flux")
    images = []
    for checkpoint, extra in ((all_in_one, tokenizers), (flux["pipe"], [])):
        out = tmp_path / f"{checkpoint.stem}.png"
        cli(["sample", "--checkpoint", str(checkpoint), *extra, "--lora", lora, "--prompt", "a fox", "-o", str(out),
             *SIZE, "--json"], capsys, monkeypatch)
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(*images) and images[0].std() > 0
    assert list(watched.iterdir()) == []

# -- textual-inversion embeddings: each slot on its own encoder (CLIP-L, T5) ------------------------------------

EMBEDDING_SLOTS = {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}


@pytest.fixture(scope="module")
def embeddings(flux) -> dict[str, Path]:
    from embedding_helpers import slot_embedding

    root = flux["root"]
    return {"both": slot_embedding(root / "fluxstyle.safetensors", {"clip_l": 768, "t5xxl": 32}),
            "t5": slot_embedding(root / "t5style.safetensors", {"t5xxl": 32}, vectors=16, seed=1, scale=10.0)}


def test_an_embedding_acts_on_clip_l_and_t5_each_through_its_own_tokens(flux, embeddings, capsys, monkeypatch):
    for which, slots in (("both", 2), ("t5", 1)):
        result = cli(["verify", str(embeddings[which]), "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys,
                     monkeypatch)
        assert_passes_fully(result, which, "flux")
        assert result["coverage"]["modules_total"] == slots  # every slot applied, on its encoder


def test_embedding_vectors_equal_added_tokens_in_each_tokenizer(flux, embeddings):
    """The prompt's encoding with the vectors hooked in equals plain transformers: each encoder's tokenizer
    extended by the tokens (add_tokens, resize_token_embeddings, rows set to the vectors); a T5-only file leaves
    CLIP-L's pooled output as the prompt without the token gives it."""
    from embedding_helpers import reference_conditioning

    from adapterzoo.formats.embedding_convert import read_embedding

    loaded = load_for_sampling(flux["pipe"], "cpu", "fp32")
    pipe = loaded.pipe
    for which in ("both", "t5"):
        path = embeddings[which]
        prompt = f"a photo of {path.stem}, in the snow"
        parts = read_embedding(path)[0].parts
        attached = attach(path, probe(path), loaded)
        handle = attached.hook()
        try:
            from adapterzoo.verify import denoise

            got = denoise.encode_prompt(pipe, prompt, attached.insert())
        finally:
            attached.remove()
        slots = {slot: EMBEDDING_SLOTS[slot] for slot in parts}
        states, added = reference_conditioning(pipe, slots, parts, path.stem, prompt)
        assert handle.calls == {name: 1 for name in slots.values()}
        assert torch.allclose(got.states, states, atol=1e-5, rtol=0), which
        assert torch.allclose(got.added["pooled"], added["pooled"], atol=1e-5, rtol=0), which
        bare = denoise.encode_prompt(pipe, attached.without(prompt))
        assert (got.states - bare.states).abs().max() > 1e-3
        assert torch.equal(got.added["pooled"], bare.added["pooled"]) == (which == "t5")


def test_t5_placeholders_keep_t5s_eos_and_padding_and_equal_an_added_token():
    """T5's tokenizer has no BOS, appends EOS (1) and pads with 0: the placeholder is none of them, the ids around
    it are the tokenizer's own, and the states (relative attention over the padding included) are those of the
    tokenizer extended by the token."""
    from embedding_helpers import extend, spelled_out, t5_tokenizer
    from flux_tiny import tiny_t5

    from adapterzoo.formats.embedding_convert import Embedding
    from adapterzoo.verify.denoise import PLACEHOLDER_ID, token_ids
    from adapterzoo.verify.runtime_embedding import apply_embedding

    tokenizer, encoder = t5_tokenizer(16), tiny_t5().eval()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (None, 1, 0)
    for prompt in ("a photo of cat", "", "a red fox, in the snow"):
        expected = tokenizer(prompt, padding="max_length", max_length=16, truncation=True).input_ids
        assert token_ids(tokenizer, prompt, length=16)[0].tolist() == expected
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    applied = apply_embedding(Embedding({"t5xxl": vectors}), "emb", {"t5xxl": "text_encoder_2"},
                              {"text_encoder_2": encoder})
    placeholders = applied.insert()["text_encoder_2"]["emb"]
    assert len(set(placeholders)) == 2 and max(placeholders) <= PLACEHOLDER_ID < 0
    ids = token_ids(tokenizer, "a photo of emb, in the snow", {"emb": placeholders}, 16)[0].tolist()
    plain = tokenizer("a photo of", add_special_tokens=False).input_ids
    rest = tokenizer(", in the snow", add_special_tokens=False).input_ids
    assert ids == plain + placeholders + rest + [1] + [0] * (16 - len(plain) - 3 - len(rest))
    with torch.no_grad():
        got = encoder(torch.tensor([ids]))[0]
        applied.remove()
        extended, grown = extend(tokenizer, encoder, "emb", vectors)
        text = spelled_out("a photo of emb, in the snow", "emb", 2)
        reference = grown(extended(text, padding="max_length", max_length=16, truncation=True,
                                   return_tensors="pt").input_ids)[0]
    assert applied.calls == {"text_encoder_2": 1}
    assert torch.allclose(got, reference, atol=1e-5, rtol=0)


def test_sample_takes_embeddings_each_slot_on_its_encoder_and_weight_0_is_without(flux, embeddings, tmp_path, capsys,
                                                                                    monkeypatch):
    from PIL import Image

    both, t5 = embeddings["both"], embeddings["t5"]
    prompt = f"a photo of {both.stem} and {t5.stem}"

    def sample(name: str, prompt: str, *specs: str) -> tuple[dict, torch.Tensor, str]:
        out = tmp_path / f"{name}.png"
        args = [a for spec in specs for a in ("--embedding", spec)]
        report = cli(["sample", "--checkpoint", str(flux["pipe"]), *args, "--prompt", prompt, "-o", str(out), *SIZE,
                      "--json"], capsys, monkeypatch)
        image = Image.open(out)
        return report, torch.tensor(list(image.getdata())), image.text["parameters"]

    on, on_pixels, text = sample("on", prompt, str(both), f"{t5}:0.5")
    assert on["loras"] == [] and on["warnings"] == []
    assert [(e["token"], e["weight"], e["slots"], e["slots_hit"], e["unmatched"]) for e in on["embeddings"]] == [
        (both.stem, 1.0, 2, 2, []), (t5.stem, 0.5, 1, 1, [])]
    assert f"TI hashes: \"{both.stem}: " in text and f"Embeddings: \"{both.name}:1, {t5.name}:0.5\"" in text
    _, off_pixels, _ = sample("off", prompt, f"{both}:0", f"{t5}:0")
    without, without_pixels, _ = sample("without", "a photo of and", str(both))
    assert without["warnings"] == [f"{both.name}: its token '{both.stem}' is in neither prompt, so it changes nothing"]
    assert torch.equal(off_pixels, without_pixels) and not torch.equal(on_pixels, off_pixels)
