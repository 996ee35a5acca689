"""Embeddings convert A1111 <-> kohya <-> diffusers with every vector unchanged, and load where they should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterzoo import tiny_models
from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.embedding_convert import convert_embedding
from adapterzoo.formats.probe import probe

A1111_FIELDS = {"name": "myconcept", "step": 1500, "sd_checkpoint": "6ce0161689", "sd_checkpoint_name": "v1-5-pruned"}


class TextualInversionHolder(TextualInversionLoaderMixin):
    """The least a diffusers pipeline needs for its own load_textual_inversion to run."""

    hf_device_map = None
    components: dict = {}

    def __init__(self, tokenizer, text_encoder) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder


def diffusers_rows(file: Path, token: str, base: str = "sd1", index: int = 1, **kwargs) -> torch.Tensor:
    """Load `file` with diffusers' own loader into a tiny CLIP; return the rows its tokens got."""
    holder = TextualInversionHolder(tiny_models.tiny_tokenizer(), tiny_models.tiny_text_encoder(base, index))
    holder.load_textual_inversion(str(file), **kwargs)
    vocab = holder.tokenizer.get_vocab()
    tokens = [token] + [f"{token}_{i}" for i in range(1, 100) if f"{token}_{i}" in vocab]
    ids = holder.tokenizer.convert_tokens_to_ids(tokens)
    return holder.text_encoder.get_input_embeddings().weight[ids].detach()


def write_a1111(path: Path, vectors: torch.Tensor, **fields) -> Path:
    """What A1111's Embedding.save writes."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, **A1111_FIELDS, **fields}, path)
    return path


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(3, 768, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def sdxl_file(tmp_path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    clip_l, clip_g = torch.randn(2, 768, generator=gen), torch.randn(2, 1280, generator=gen).half()
    path = tmp_path / "xl_style.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))
    return path, clip_l, clip_g


def test_a1111_to_kohya_and_back_keeps_vectors_and_fields(tmp_path, vectors):
    src = write_a1111(tmp_path / "myconcept.pt", vectors)
    report = convert_embedding(src, tmp_path / "k.safetensors", "kohya")
    kohya = load_file(tmp_path / "k.safetensors")
    assert set(kohya) == {"emb_params"} and torch.equal(kohya["emb_params"], vectors)
    assert report["base"] == "sd1" and report["vectors"] == 3
    assert probe(tmp_path / "k.safetensors").format == "kohya"

    convert_embedding(tmp_path / "k.safetensors", tmp_path / "back.pt", "a1111")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert back["string_to_token"] == {"*": 265}
    assert set(back["string_to_param"]) == {"*"} and torch.equal(back["string_to_param"]["*"], vectors)
    assert {k: back[k] for k in A1111_FIELDS} == A1111_FIELDS


def test_a1111_to_diffusers_multi_vector_loads_in_diffusers_as_tok_tok_1_tok_2(tmp_path, vectors):
    src = write_a1111(tmp_path / "myconcept.pt", vectors)
    report = convert_embedding(src, tmp_path / "learned_embeds.safetensors", "diffusers", token="<cat-toy>")
    assert report["token"] == "<cat-toy>"
    stored = load_file(tmp_path / "learned_embeds.safetensors")
    assert set(stored) == {"<cat-toy>"} and torch.equal(stored["<cat-toy>"], vectors)
    assert torch.equal(diffusers_rows(tmp_path / "learned_embeds.safetensors", "<cat-toy>"), vectors)


def test_diffusers_to_a1111_is_read_by_diffusers_a1111_reader_and_token_becomes_name(tmp_path, vectors):
    save_file({"<tok>": vectors}, str(tmp_path / "learned_embeds.safetensors"))
    convert_embedding(tmp_path / "learned_embeds.safetensors", tmp_path / "tok.pt", "a1111")
    written = torch.load(tmp_path / "tok.pt", weights_only=True)
    assert written["name"] == "<tok>" and written["step"] == 0
    assert {"string_to_token", "string_to_param", "sd_checkpoint", "sd_checkpoint_name"} <= set(written)
    assert torch.equal(diffusers_rows(tmp_path / "tok.pt", "<tok>"), vectors)  # diffusers reads A1111 dicts


def test_sdxl_kohya_to_diffusers_writes_one_file_per_encoder_and_back(tmp_path, sdxl_file):
    path, clip_l, clip_g = sdxl_file
    report = convert_embedding(path, tmp_path / "learned_embeds.safetensors", "diffusers", token="<xl>")
    first, second = tmp_path / "learned_embeds.safetensors", tmp_path / "learned_embeds_2.safetensors"
    assert report["outputs"] == [str(first), str(second)] and report["base"] == "sdxl"
    assert torch.equal(load_file(first)["<xl>"], clip_l) and torch.equal(load_file(second)["<xl>"], clip_g)
    assert torch.equal(diffusers_rows(first, "<xl>", "sdxl", 1), clip_l)
    assert torch.equal(diffusers_rows(second, "<xl>", "sdxl", 2), clip_g.float())

    for start in (first, second):  # either half finds its partner
        out = tmp_path / f"from_{start.stem}.safetensors"
        convert_embedding(start, out, "kohya")
        kohya = load_file(out)
        assert torch.equal(kohya["clip_l"], clip_l) and torch.equal(kohya["clip_g"], clip_g)
        assert kohya["clip_g"].dtype == torch.float16


def test_sdxl_to_a1111_is_refused_and_lone_clip_g_half_is_explained(tmp_path, sdxl_file):
    path, _, clip_g = sdxl_file
    with pytest.raises(AdapterzooError, match="use --to kohya"):
        convert_embedding(path, tmp_path / "x.pt", "a1111")
    save_file({"<xl>": clip_g}, str(tmp_path / "lonely_2.safetensors"))
    with pytest.raises(BadFileError, match="its clip_l half lonely.safetensors is missing"):
        convert_embedding(tmp_path / "lonely_2.safetensors", tmp_path / "x.safetensors", "kohya")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.safetensors").exists()


def test_sdxl_halves_with_different_vector_counts_are_refused(tmp_path):
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(BadFileError, match="clip_l has 2 vectors but clip_g has 3"):
        convert_embedding(tmp_path / "bad.safetensors", tmp_path / "x.safetensors", "diffusers")


def test_old_textual_inversion_parameterdict_converts(tmp_path, vectors):
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "old", "step": 7},
               tmp_path / "old.pt")
    report = convert_embedding(tmp_path / "old.pt", tmp_path / "old.safetensors", "kohya")
    assert report["from"] == "a1111" and report["token"] == "old"
    assert torch.equal(load_file(tmp_path / "old.safetensors")["emb_params"], vectors)


def test_single_vector_bin_and_split_token_files_read_as_n_by_dim(tmp_path):
    one = torch.randn(1024, generator=torch.Generator().manual_seed(3))
    torch.save({"<sd2>": one}, tmp_path / "learned_embeds.bin")  # sd-concepts-library style
    report = convert_embedding(tmp_path / "learned_embeds.bin", tmp_path / "sd2.pt", "a1111")
    assert report["base"] == "sd2" and report["vectors"] == 1
    assert torch.equal(torch.load(tmp_path / "sd2.pt", weights_only=True)["string_to_param"]["*"], one[None])

    rows = torch.randn(3, 768, generator=torch.Generator().manual_seed(4))
    save_file({"<t>": rows[0], "<t>_1": rows[1], "<t>_2": rows[2]}, str(tmp_path / "split.safetensors"))
    convert_embedding(tmp_path / "split.safetensors", tmp_path / "joined.safetensors", "diffusers")
    assert torch.equal(load_file(tmp_path / "joined.safetensors")["<t>"], rows)


def test_kohya_pickle_output_and_metadata_name(tmp_path, vectors):
    src = write_a1111(tmp_path / "myconcept.pt", vectors)
    convert_embedding(src, tmp_path / "k.safetensors", "kohya", token="trigger")
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as handle:
        assert handle.metadata()["name"] == "trigger" and handle.metadata()["step"] == "1500"
    convert_embedding(src, tmp_path / "k.pt", "kohya")
    assert torch.equal(torch.load(tmp_path / "k.pt", weights_only=True)["emb_params"], vectors)


def test_output_name_must_fit_the_container(tmp_path, vectors):
    src = write_a1111(tmp_path / "myconcept.pt", vectors)
    with pytest.raises(AdapterzooError, match="name the output .pt"):
        convert_embedding(src, tmp_path / "x.safetensors", "a1111")
    with pytest.raises(AdapterzooError, match="name the kohya output .safetensors"):
        convert_embedding(src, tmp_path / "x.ckpt.txt", "kohya")
