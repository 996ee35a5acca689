"""Checkpoints both ways: diffusers folder <-> single-file LDM, judged by diffusers' own loaders.

Tiny pipelines (random weights, real context widths and text-encoder layouts) go folder -> our
LDM file -> diffusers' `from_single_file` and LDM file -> our folder -> `from_pretrained`; every
weight must come back identical. Real-size layouts are checked on sparse files (shapes only).
"""

from __future__ import annotations

import json
import math
import os
import shutil

import factory
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from adapterzoo import tiny_models
from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.checkpoint import clip_tokenizer
from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint
from adapterzoo.formats.families.sd.to_diffusers import plan_diffusers
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.unet_names import UnetLayout, diffusers_to_ldm_module, ldm_to_diffusers_module

PIPELINE = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
FIXTURES = factory.REAL


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def weights(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for part in PARTS:
        model = getattr(pipe, part, None)
        if model is not None:
            out.update({f"{part}.{k}": v for k, v in model.state_dict().items()})
    return out


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    different = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not different, different[:5]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """base -> (original folder, our LDM file, our diffusers folder made from that file)."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for base in tiny_models.BASES:
        folder = tiny_models.save_tiny_pipeline(base, root / base, seed=1)
        ldm, back = root / f"{base}.safetensors", root / f"{base}_back"
        to_ldm = convert_checkpoint(folder, ldm, "ldm")
        to_diffusers = convert_checkpoint(ldm, back, "diffusers")
        out[base] = (folder, ldm, back, to_ldm, to_diffusers)
    return out


@pytest.fixture(scope="session")
def originals(converted):
    return {base: PIPELINE[base].from_pretrained(folder, local_files_only=True)
            for base, (folder, *_) in converted.items()}


@pytest.fixture(scope="session")
def ours(converted):
    """Our diffusers folders, loaded by diffusers with no hint of what they hold."""
    return {base: DiffusionPipeline.from_pretrained(back, local_files_only=True)
            for base, (_, _, back, *_) in converted.items()}


@pytest.mark.parametrize("base", tiny_models.BASES)
def test_our_ldm_file_reads_back_identically_with_diffusers_from_single_file(converted, originals, base):
    folder, ldm, _, report, _ = converted[base]
    assert report["base"] == base and report["to"] == "ldm" and report["dtype"] == "fp32"
    single = PIPELINE[base].from_single_file(str(ldm), config=str(folder), local_files_only=True)
    assert_same_weights(weights(single), weights(originals[base]))


@pytest.mark.parametrize("base", tiny_models.BASES)
def test_our_diffusers_folder_loads_with_from_pretrained_identically(converted, originals, ours, base):
    report = converted[base][4]
    assert report["base"] == base and report["tensors"] == len(weights(originals[base]))
    pipe = ours[base]
    assert type(pipe) is PIPELINE[base]
    assert_same_weights(weights(pipe), weights(originals[base]))
    original_unet = originals[base].unet.config
    for field in ("block_out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
                  "down_block_types", "up_block_types", "addition_embed_type",
                  "projection_class_embeddings_input_dim"):
        assert pipe.unet.config[field] == original_unet[field], field
    assert pipe.vae.config.block_out_channels == originals[base].vae.config.block_out_channels
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize("base", tiny_models.BASES)
def test_text_encoders_from_our_folder_compute_what_the_originals_compute(originals, ours, base):
    prompt = "a red cat on a bridge at night"
    ids = originals[base].tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
    for part in ("text_encoder", "text_encoder_2"):
        original = getattr(originals[base], part, None)
        if original is None:
            continue
        with torch.no_grad():
            want = original(ids, output_hidden_states=True)
            got = getattr(ours[base], part)(ids, output_hidden_states=True)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(got.hidden_states[-2], want.hidden_states[-2], rtol=0, atol=0)
        if part == "text_encoder_2":  # pooled projection: checks the text_projection transpose
            torch.testing.assert_close(got.text_embeds, want.text_embeds, rtol=0, atol=0)


def test_openclip_in_proj_is_fused_q_k_v_as_multihead_attention_reads_it(converted, originals):
    """Our SD2 file's fused in_proj, run through nn.MultiheadAttention (what OpenCLIP is), equals HF attention."""
    _, ldm, *_ = converted["sd2"]
    layer = originals["sd2"].text_encoder.encoder.layers[0].self_attn
    prefix = "cond_stage_model.model.transformer.resblocks.0.attn."
    names = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    with safe_open(str(ldm), "pt") as fh:
        fused = {k: fh.get_tensor(prefix + k) for k in names}
    width, heads = layer.q_proj.weight.shape[0], originals["sd2"].text_encoder.config.num_attention_heads
    mha = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    mha.load_state_dict(fused)
    x = torch.randn(2, 7, width, generator=torch.Generator().manual_seed(0))
    mask = torch.full((7, 7), float("-inf")).triu(1)
    with torch.no_grad():
        got, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
        q, k, v = (proj(x).view(2, 7, heads, -1).transpose(1, 2) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(width // heads) + mask
        want = layer.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, width))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="session")
def odd_pipeline(tmp_path_factory):
    """Inpainting UNet of a non-standard size: 3 levels (32, 64, 96), one resnet per level, depth (2, 1) + mid 1."""
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        transformer_layers_per_block=(2, 1, 1), cross_attention_dim=768, attention_head_dim=2,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=4,
    )
    pipe = StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=tiny_models.tiny_text_encoder("sd1"), tokenizer=tiny_models.tiny_tokenizer(),
        unet=unet, scheduler=tiny_models.tiny_scheduler("sd1"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("odd") / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def test_non_standard_sizes_round_trip_with_configs_inferred_from_shapes(odd_pipeline, tmp_path):
    folder, original = odd_pipeline
    ldm, back = tmp_path / "odd.safetensors", tmp_path / "odd"
    convert_checkpoint(folder, ldm, "ldm")
    single = StableDiffusionInpaintPipeline.from_single_file(str(ldm), config=str(folder), local_files_only=True)
    assert_same_weights(weights(single), weights(original))

    report = convert_checkpoint(ldm, back, "diffusers")
    ours = DiffusionPipeline.from_pretrained(back, local_files_only=True)
    assert type(ours) is StableDiffusionInpaintPipeline and report["base"] == "sd1"
    assert_same_weights(weights(ours), weights(original))
    assert ours.unet.config.block_out_channels == [32, 64, 96]
    assert ours.unet.config.layers_per_block == 1 and ours.unet.config.in_channels == 9
    assert ours.unet.config.transformer_layers_per_block == [2, 1, 1]
    assert ours.vae.config.block_out_channels == [32, 64, 64] and ours.vae.config.layers_per_block == 2


@pytest.mark.parametrize(
    ("base", "heads", "depths", "layers", "dropped"),
    [("sd2", [5, 10, 20, 20], 1, [23], 15), ("sdxl", [5, 10, 20], [1, 2, 10], [12, 32], 3)],
)
def test_real_size_layouts_are_inferred_from_shapes_alone(tmp_path, base, heads, depths, layers, dropped):
    """Sparse real-size files (header + hole); planning reads shapes only and checks them against real models."""
    path = factory.write_sparse_safetensors(tmp_path / f"{base}.safetensors", factory.sd_checkpoint_specs(base))
    plan = plan_diffusers(open_checkpoint_file(path), None)
    unet, vae, *texts = (c.model.config for c in plan.components)
    assert unet.attention_head_dim == heads and unet.transformer_layers_per_block == depths
    assert [t.num_hidden_layers for t in texts] == layers and vae.block_out_channels == [128, 256, 512, 512]
    assert plan.dropped == dropped  # SD2: layer 23, text_projection, logit_scale, alphas_cumprod
    if base == "sdxl":
        assert unet.addition_time_embed_dim == 256 and unet.projection_class_embeddings_input_dim == 2816
        assert texts[1].projection_dim == 1280 and plan.pipeline == "StableDiffusionXLPipeline"
    else:
        assert plan.prediction_type == "v_prediction" and plan.warnings  # a guess, and the report says so


SD1_LAYOUT = UnetLayout(2, (True, True, True, False), (False, True, True, True))
SDXL_LAYOUT = UnetLayout(2, (False, True, True), (True, True, False))


@pytest.mark.parametrize(
    ("layout", "diffusers", "ldm"),
    [  # pairs from FORMATS.md §2.1
        (SD1_LAYOUT, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        (SD1_LAYOUT, "down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
        (SD1_LAYOUT, "up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
        (SDXL_LAYOUT, "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        (SDXL_LAYOUT, "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
         "input_blocks.4.1.transformer_blocks.1.attn2.to_k"),
        (SDXL_LAYOUT, "down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        (SDXL_LAYOUT, "mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
        (SDXL_LAYOUT, "add_embedding.linear_2", "label_emb.0.2"),
    ],
)
def test_module_paths_follow_the_block_arithmetic(layout, diffusers, ldm):
    assert diffusers_to_ldm_module(diffusers, layout) == ldm
    assert ldm_to_diffusers_module(ldm, layout) == diffusers
    assert diffusers_to_ldm_module(diffusers + ".weight", layout) == ldm + ".weight"


def test_module_paths_that_do_not_exist_in_the_layout_map_to_nothing():
    assert diffusers_to_ldm_module("down_blocks.3.attentions.0.proj_in", SD1_LAYOUT) is None  # no attention there
    assert diffusers_to_ldm_module("down_blocks.3.downsamplers.0.conv", SD1_LAYOUT) is None  # last level keeps size
    assert ldm_to_diffusers_module("output_blocks.12.0.in_layers.2", SD1_LAYOUT) is None


@pytest.fixture(scope="session")
def pickle_checkpoint(converted, tmp_path_factory):
    """A Lightning-style .ckpt: wrapped state dict, EMA copies, an int64 buffer, bookkeeping."""
    state = load_file(converted["sd1"][1])
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.randn(32, 4, 3, 3)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1234, "epoch": 3}, path)
    return path, state


def test_ckpt_becomes_safetensors_with_every_tensor_equal(pickle_checkpoint, tmp_path):
    path, state = pickle_checkpoint
    report = convert_checkpoint(path, tmp_path / "model.safetensors", "ldm")
    assert report["tensors"] == len(state) and report["dropped"] == 0
    assert_same_weights(load_file(tmp_path / "model.safetensors"), state)


def test_prune_ema_drops_model_ema_and_keeps_the_rest(pickle_checkpoint, tmp_path):
    path, state = pickle_checkpoint
    report = convert_checkpoint(path, tmp_path / "pruned.safetensors", "ldm", prune_ema=True)
    assert report["dropped"] == 2
    assert_same_weights(load_file(tmp_path / "pruned.safetensors"),
                        {k: v for k, v in state.items() if not k.startswith("model_ema.")})


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_casts_floating_tensors_and_leaves_integer_ones(pickle_checkpoint, tmp_path, name, dtype):
    path, state = pickle_checkpoint
    report = convert_checkpoint(path, tmp_path / "cast.safetensors", "ldm", dtype=name)
    out = load_file(tmp_path / "cast.safetensors")
    assert report["dtype"] == name
    assert_same_weights(out, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    assert out["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_dtype_applies_to_a_diffusers_folder_made_from_a_file(converted, tmp_path):
    convert_checkpoint(converted["sd2"][1], tmp_path / "half", "diffusers", dtype="fp16")
    for part in ("unet", "vae", "text_encoder"):
        stem = "model" if part.startswith("text") else "diffusion_pytorch_model"
        written = load_file(tmp_path / "half" / part / f"{stem}.safetensors")
        assert {t.dtype for t in written.values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "half", dtype=torch.float16, local_files_only=True)
    want = load_file(converted["sd2"][0] / "text_encoder" / "model.safetensors")
    got = pipe.text_encoder.state_dict()
    assert_same_weights(got, {k.removeprefix("text_model."): v.half() for k, v in want.items()})


def test_existing_output_is_refused_without_force_and_replaced_with_it(converted, tmp_path):
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"keep me")
    with pytest.raises(AdapterzooError, match="already exists; pass --force"):
        convert_checkpoint(converted["sd1"][0], dest, "ldm")
    assert dest.read_bytes() == b"keep me"
    convert_checkpoint(converted["sd1"][0], dest, "ldm", force=True)
    assert load_file(dest).keys() == load_file(converted["sd1"][1]).keys()


def test_never_writes_over_or_into_the_input(converted, tmp_path):
    folder, ldm, back, *_ = converted["sd1"]
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    with pytest.raises(AdapterzooError, match="one of the inputs"):
        convert_checkpoint(ldm, ldm, "ldm", force=True)
    with pytest.raises(AdapterzooError, match="inside the input folder"):
        convert_checkpoint(folder, folder / "unet" / "x.safetensors", "ldm", force=True)
    with pytest.raises(AdapterzooError, match="holding the input"):
        convert_checkpoint(ldm, ldm.parent, "diffusers", force=True)
    user_folder = tmp_path / "my models"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("mine")
    with pytest.raises(AdapterzooError, match="not a diffusers folder"):
        convert_checkpoint(ldm, user_folder, "diffusers", force=True)
    assert (user_folder / "notes.txt").read_text() == "mine"
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_a_failed_conversion_leaves_no_output_and_no_temp_files(converted, tmp_path):
    state = load_file(converted["sd1"][1])
    del state["model.diffusion_model.output_blocks.3.1.proj_out.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    out = tmp_path / "out"
    with pytest.raises(BadFileError, match="unet config inferred from the weights does not fit them: 1 missing"):
        convert_checkpoint(broken, out, "diffusers")
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors"]


@pytest.mark.parametrize("kind", ["lora", "garbage-ckpt", "truncated"])
def test_files_that_are_not_checkpoints_are_refused_in_one_line(converted, tmp_path, kind):
    if kind == "lora":
        src = tmp_path / "lora.safetensors"
        shutil.copyfile(FIXTURES / "lora_disney.safetensors", src)
    elif kind == "garbage-ckpt":
        src = tmp_path / "model.ckpt"
        src.write_bytes(b"this is not a pickle at all")
    else:
        src = tmp_path / "cut.safetensors"
        src.write_bytes(converted["sd1"][1].read_bytes()[:5000])
    for to, dest in (("diffusers", tmp_path / "out"), ("ldm", tmp_path / "out.safetensors")):
        with pytest.raises(BadFileError) as info:
            convert_checkpoint(src, dest, to)
        assert "\n" not in str(info.value) and not dest.exists()


def test_tokenizer_comes_from_the_hf_cache_first(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "hub" / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    clip_tokenizer.write_clip_tokenizer(tmp_path / "shipped", "<|endoftext|>")
    vocab = json.loads((tmp_path / "shipped" / "vocab.json").read_text(encoding="utf-8"))
    dog = vocab["dog</w>"]
    vocab["cat</w>"], vocab["dog</w>"] = dog, vocab["cat</w>"]  # a cache we can tell apart from the shipped data
    (snapshot / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copyfile(tmp_path / "shipped" / "merges.txt", snapshot / "merges.txt")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    origin = clip_tokenizer.write_clip_tokenizer(tmp_path / "from_cache", "!")
    assert "cache" in origin
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "from_cache")
    assert tokenizer("a cat").input_ids == [49406, 320, dog, 49407]
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0


def test_missing_tokenizer_data_names_what_is_missing(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(clip_tokenizer, "BPE_FILE", tmp_path / "gone.txt.gz")
    with pytest.raises(AdapterzooError, match=r"gone\.txt\.gz is missing .* openai/clip-vit-large-patch14"):
        clip_tokenizer.write_clip_tokenizer(tmp_path / "tok", "!")
