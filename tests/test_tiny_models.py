"""The tiny models are what the demo and the sampler run on: they must load offline and render."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from adapterzoo import tiny_models

PIPELINE_CLASS = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def render(pipe, prompt: str = "a photo of a red cat") -> np.ndarray:
    out = pipe(
        prompt,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images



@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {base: tiny_models.save_tiny_pipeline(base, root / base, seed=0) for base in tiny_models.BASES}


@pytest.mark.parametrize("base", tiny_models.BASES)
def test_saved_pipeline_loads_offline_and_renders_like_the_one_in_memory(saved, base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = PIPELINE_CLASS[base].from_pretrained(saved[base], local_files_only=True)
    images = render(loaded)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.std() > 0
    np.testing.assert_allclose(images, render(tiny_models.tiny_pipeline(base, seed=0)), atol=1e-5)


def test_folders_stay_small(saved):
    sizes = {base: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) for base, folder in saved.items()}
    assert sizes["sd1"] < 30e6 and sizes["sd2"] < 35e6, sizes
    assert sizes["sdxl"] < 80e6, sizes  # bigG's one 1280-wide layer alone is 26 MB in fp32
    for folder in (saved["sd1"] / "tokenizer", saved["sdxl"] / "tokenizer_2"):
        assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()  # what transformers 4 reads


@pytest.mark.parametrize(
    ("base", "context", "conv_proj_in"), [("sd1", 768, True), ("sd2", 1024, False), ("sdxl", 2048, False)]
)
def test_unet_has_the_real_context_width_and_projection(base, context, conv_proj_in):
    unet = tiny_models.tiny_unet(base)
    shapes = {name: tuple(p.shape) for name, p in unet.named_parameters()}
    to_k = [s for n, s in shapes.items() if n.endswith("attn2.to_k.weight")]
    assert to_k and all(s[1] == context for s in to_k)
    proj_in = [s for n, s in shapes.items() if n.endswith("proj_in.weight")]
    assert proj_in and all((len(s) == 4) == conv_proj_in for s in proj_in)
    if base == "sdxl":
        pooled = tiny_models.tiny_text_encoder("sdxl", 2).config.projection_dim
        assert shapes["add_embedding.linear_1.weight"][1] == pooled + 6 * unet.config.addition_time_embed_dim


def test_sdxl_text_encoders_concatenate_to_the_unet_context():
    widths = [tiny_models.tiny_text_encoder("sdxl", i).config.hidden_size for i in (1, 2)]
    assert widths == [768, 1280] and sum(widths) == tiny_models.tiny_unet("sdxl").config.cross_attention_dim


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = (tiny_models.tiny_pipeline("sd1", seed=s).unet.conv_in.weight for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tokenizer_files_load_and_know_words_and_specials(tmp_path):
    folder = tiny_models.write_tiny_tokenizer(tmp_path / "tok")
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A photo of a cat, zebra!").input_ids)
    assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>"
    assert tokens[1:5] == ["a</w>", "photo</w>", "of</w>", "a</w>"]
    assert "".join(tokens[1:-1]).replace("</w>", "") == "aphotoofacat,zebra!"
    assert len(tokenizer) <= tiny_models.VOCAB_SIZE
    assert tokenizer.model_max_length == 77
    assert tokenizer("x", padding="max_length").input_ids.__len__() == 77
