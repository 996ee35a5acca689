"""Wan 2.1 / 2.2 (issue 17): LoRAs of every dialect in and out, original/ComfyUI checkpoints both ways, merge,
extract, resize, and the probe of each release (size, task, version; 2.2's expert only where a file says).
Oracles: diffusers' Wan converters and loader (`WanPipeline.lora_state_dict` + `load_lora_into_transformer`, its
single-file `convert_wan_transformer_to_diffusers`) on a tiny `WanTransformer3DModel` with 2.1 I2V's image
attention, its meta-device module table, and ΔW = alpha / r · up @ down in plain torch. Every Wan name is one
diffusers module renamed (`RENAMED` below, written out here from Wan's code, not from adapterzoo's tables)."""

from __future__ import annotations

import copy
import json
import shutil

import factory
import numpy as np
import pytest
import torch
from deltas import kohya_deltas
from diffusers import WanPipeline, WanTransformer3DModel
from layout_checks import (
    applied,
    assert_best_rank,
    assert_close_deltas,
    assert_same_model,
    assert_same_tensors,
    assert_same_deltas,
    cli,
    converted_deltas,
    layout_deltas,
    loaded_deltas,
    random_factors,
    rank_one_tensors,
    refused,
    rows,
    write_layout_lora,
)
from peft import PeftModel
from safetensors.torch import load_file, save_file

from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.model.architectures import architecture_from_models
from adapterzoo.formats.probe import probe

D, FFN, IN, OUT, TEXT, IMAGE = 128, 64, 36, 16, 32, 24  # one head of 128 (Wan's head dim), two blocks, 2.1 I2V-like
LDM = "model.diffusion_model."
# Wan's name of each block Linear -> diffusers' (the Wan2.1 repo's WanAttentionBlock against WanTransformerBlock)
RENAMED = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
           "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
           "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj",
           "cross_attn.v_img": "attn2.add_v_proj", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
TOP = {"head.head": "proj_out", "time_projection.1": "condition_embedder.time_proj",
       "text_embedding.0": "condition_embedder.text_embedder.linear_1",
       "text_embedding.2": "condition_embedder.text_embedder.linear_2",
       "time_embedding.0": "condition_embedder.time_embedder.linear_1",
       "time_embedding.2": "condition_embedder.time_embedder.linear_2",
       "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
       "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2"}
OURS = {f"blocks.{n}.{wan}": f"blocks.{n}.{ours}" for n in range(2) for wan, ours in RENAMED.items()}


def shape_of(model: torch.nn.Module, path: str) -> tuple[int, int]:
    return tuple(model.get_submodule(path).weight.shape)


@pytest.fixture(scope="module")
def model() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=D, in_channels=IN,
                                 out_channels=OUT, text_dim=TEXT, freq_dim=32, ffn_dim=FFN, num_layers=2,
                                 image_dim=IMAGE, added_kv_proj_dim=D).eval()


@pytest.fixture(scope="module")
def arch(model):
    return architecture_from_models("wan", {"transformer": model})


@pytest.fixture(scope="module")
def factors(model):
    """A LoRA on every block Linear (what musubi-tuner trains and diffusers' musubi converter requires), by Wan name."""
    return random_factors({wan: shape_of(model, ours) for wan, ours in OURS.items()}, seed=4)


def mapping(factors) -> dict:
    """Wan's name -> the diffusers module its rows are (all of them: nothing fused)."""
    return {wan: rows((OURS.get(wan) or TOP[wan], up.shape[0])) for wan, (_, up, _) in factors.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def musubi(tmp_path_factory, factors):
    """musubi-tuner's names: lora_unet_ + Wan's module flattened, alpha per module."""
    return write_layout_lora(tmp_path_factory.mktemp("src") / "musubi.safetensors", factors,
                             lambda p: "lora_unet_" + p.replace(".", "_"), "lora_down", "lora_up", alpha=True)


def load_into(state_dict: dict, transformer) -> None:
    WanPipeline.load_lora_into_transformer(state_dict, transformer=transformer)


# -- reading every dialect ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["comfy", "comfy-alpha", "comfy-down-up", "diffusers", "peft", "musubi",
                                     "lycoris"])
def test_every_dialect_reads_the_same_delta(tmp_path, arch, factors, musubi, dialect):
    """Each spelling reads as the ΔW of diffusers' modules; where diffusers has a converter (ComfyUI's and
    musubi's names), it reads the same."""
    path, expected = tmp_path / f"{dialect}.safetensors", layout_deltas(factors, mapping(factors))
    unscaled = layout_deltas(factors, mapping(factors), scaled=False)
    if dialect == "comfy":  # ComfyUI's (and diffusers' non-diffusers) names, no alpha
        write_layout_lora(path, factors, lambda p: f"diffusion_model.{p}")
        expected = unscaled
    elif dialect == "comfy-alpha":
        write_layout_lora(path, factors, lambda p: f"diffusion_model.{p}", alpha=True)
    elif dialect == "comfy-down-up":
        write_layout_lora(path, factors, lambda p: f"diffusion_model.{p}", "lora_down", "lora_up", alpha=True)
    elif dialect == "diffusers":
        write_layout_lora(path, factors, lambda p: f"transformer.{OURS[p]}", alpha=True)
    elif dialect == "peft":
        write_layout_lora(path, factors, lambda p: f"base_model.model.{OURS[p]}")
        expected = unscaled
    elif dialect == "lycoris":
        write_layout_lora(path, factors, lambda p: "lycoris_" + p.replace(".", "_"), "lora_down", "lora_up",
                          alpha=True)
    else:
        path = musubi
    found = probe(path)
    assert (found.kind, found.base) == ("lora", "wan")
    assert found.format == {"comfy-alpha": "comfy", "comfy-down-up": "comfy", "musubi": "kohya",
                            "lycoris": "kohya"}.get(dialect, dialect)  # a LoCon of LyCORIS is kohya's parts
    coverage = found.details["coverage"]
    assert coverage["blocks"] == [0, 1] and coverage["ffn"] and coverage["image_conditioning"]
    assert_same_deltas(load_lora(path, architecture=arch), expected)
    if dialect.startswith("comfy") or dialect == "musubi":
        assert_close_deltas(converted_deltas(WanPipeline.lora_state_dict(str(path))), expected)


def test_top_level_modules_read_as_diffusers_reads_them(tmp_path, model, arch):
    """head.head, time_projection.1, the text and time embeddings and 2.1's image embedder under ComfyUI's names
    (beside one block's q: diffusers' converter wants a block)."""
    modules = {**TOP, "blocks.0.self_attn.q": OURS["blocks.0.self_attn.q"]}
    factors = random_factors({wan: shape_of(model, ours) for wan, ours in modules.items()}, seed=6)
    path = write_layout_lora(tmp_path / "top.safetensors", factors, lambda p: f"diffusion_model.{p}")
    expected = layout_deltas(factors, mapping(factors), scaled=False)
    assert_same_deltas(load_lora(path, architecture=arch), expected)
    assert_close_deltas(converted_deltas(WanPipeline.lora_state_dict(str(path))), expected)
    assert probe(path).details["coverage"]["other_modules"] == len(TOP)


def test_a_lora_of_the_conv3d_patch_embedding(tmp_path, model, arch, folder, capsys, monkeypatch):
    """Wan's patch embedding is a Conv3d (kernel 1x2x2): its LoRA (down [r, in, 1, 2, 2], up [out, r, 1, 1, 1]) reads,
    converts to a diffusers file PEFT's Conv3d layer loads with the same ΔW, and merges into the single file."""
    gen = torch.Generator().manual_seed(9)
    down, up = torch.randn(2, IN, 1, 2, 2, generator=gen) * 0.1, torch.randn(D, 2, 1, 1, 1, generator=gen) * 0.1
    q_down, q_up = torch.randn(2, D, generator=gen) * 0.1, torch.randn(D, 2, generator=gen) * 0.1
    save_file({"diffusion_model.patch_embedding.lora_down.weight": down,
               "diffusion_model.patch_embedding.lora_up.weight": up, "diffusion_model.patch_embedding.alpha":
               torch.tensor(1.0), "diffusion_model.blocks.0.self_attn.q.lora_down.weight": q_down,
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": q_up}, str(tmp_path / "c.safetensors"))
    expected = {"transformer.patch_embedding": 0.5 * (up.double().flatten(1) @ down.double().flatten(1)).reshape(
        D, IN, 1, 2, 2), "transformer.blocks.0.attn1.to_q": q_up.double() @ q_down.double()}
    assert_same_deltas(load_lora(tmp_path / "c.safetensors", architecture=arch), expected)
    for to in ("diffusers", "kohya", "comfy"):
        dest = tmp_path / f"{to}.safetensors"
        cli(["convert", str(tmp_path / "c.safetensors"), "-o", str(dest), "--to", to, "--checkpoint", str(folder)],
            capsys, monkeypatch)
        assert_same_deltas(load_lora(dest, architecture=arch), expected)
    written = load_file(tmp_path / "diffusers.safetensors")
    assert written["transformer.patch_embedding.lora_B.weight"].shape == (D, 2, 1, 1, 1)
    assert_close_deltas(loaded_deltas(model, written, load_into), expected)
    base = tmp_path / "w.safetensors"
    save_file(wan_state_dict(model), str(base))
    cli(["merge", str(base), "--lora", str(tmp_path / "c.safetensors"), "-o", str(tmp_path / "m.safetensors")],
        capsys, monkeypatch)
    merged = load_file(tmp_path / "m.safetensors")["patch_embedding.weight"].double()
    weight = model.patch_embedding.weight.detach().double()
    assert torch.allclose(merged, weight + expected["transformer.patch_embedding"], atol=1e-6, rtol=0)


def test_lokr_of_lycoris_reads(tmp_path, arch):
    gen = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(4, 2, generator=gen), torch.randn(D // 4, FFN // 2, generator=gen)
    save_file({"lycoris_blocks_1_ffn_2.lokr_w1": w1, "lycoris_blocks_1_ffn_2.lokr_w2": w2},
              str(tmp_path / "l.safetensors"))
    assert_same_deltas(load_lora(tmp_path / "l.safetensors", architecture=arch),
                       {"transformer.blocks.1.ffn.net.2": torch.kron(w1.double(), w2.double())})


# -- writing, read back by diffusers --------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["diffusers", "kohya", "comfy"])
def test_every_output_loads_in_diffusers_with_the_same_delta(tmp_path, model, folder, factors, musubi, to,
                                                             capsys, monkeypatch):
    """musubi -> each dialect through the CLI: diffusers' loader patches every module with the ΔW its own converter
    reads from the musubi source."""
    expected = layout_deltas(factors, mapping(factors))
    assert_close_deltas(converted_deltas(WanPipeline.lora_state_dict(str(musubi))), expected)
    dest = tmp_path / f"{to}.safetensors"
    report = cli(["convert", str(musubi), "-o", str(dest), "--to", to, "--checkpoint", str(folder)], capsys, monkeypatch)
    assert (report["base"], report["modules"]) == ("wan", len(expected))
    written = load_file(dest)
    prefix = {"diffusers": "transformer.blocks.", "kohya": "lora_unet_blocks_", "comfy": "diffusion_model.blocks."}[to]
    assert all(k.startswith(prefix) for k in written)
    assert_close_deltas(loaded_deltas(model, WanPipeline.lora_state_dict(str(dest)), load_into), expected)
    if to == "diffusers":  # the model's own loader reads the file as written
        adapter = loaded_deltas(model, load_file(dest), lambda sd, m: m.load_lora_adapter(sd, prefix="transformer"))
        assert_close_deltas(adapter, expected)
    if to == "kohya":  # musubi's own names and alphas back
        assert sorted(written) == sorted(load_file(musubi))
    if to == "comfy":
        assert any(".cross_attn.k_img." in k for k in written) and not any(".alpha" in k for k in written)


def test_peft_output_loads_in_peft(tmp_path, model, folder, factors, musubi, capsys, monkeypatch):
    cli(["convert", str(musubi), "-o", str(tmp_path / "peft"), "--to", "peft", "--checkpoint", str(folder)],
        capsys, monkeypatch)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    got = {f"transformer.{name.removeprefix('base_model.model.')}": m.get_delta_weight("default").double()
           for name, m in loaded.named_modules() if hasattr(m, "get_delta_weight") and m.active_adapters}
    assert_close_deltas(got, layout_deltas(factors, mapping(factors)))


def real_musubi_specs(width: int, ffn: int, blocks: int = 2, image: bool = False, rank: int = 4) -> dict:
    """musubi-tuner's Wan LoRA (names, shapes): every block Linear at a release's width."""
    shapes = {"self_attn_q": (width, width), "self_attn_k": (width, width), "self_attn_v": (width, width),
              "self_attn_o": (width, width), "cross_attn_q": (width, width), "cross_attn_k": (width, width),
              "cross_attn_v": (width, width), "cross_attn_o": (width, width), "ffn_0": (ffn, width),
              "ffn_2": (width, ffn)}
    if image:
        shapes |= {"cross_attn_k_img": (width, width), "cross_attn_v_img": (width, width)}
    specs = {}
    for n in range(blocks):
        for module, (out, inp) in shapes.items():
            stem = f"lora_unet_blocks_{n}_{module}"
            specs |= {f"{stem}.lora_down.weight": ("BF16", (rank, inp)), f"{stem}.lora_up.weight": ("BF16", (out, rank)),
                      f"{stem}.alpha": ("F32", ())}
    return specs


def test_a_real_size_lora_converts_against_the_builtin_table(tmp_path, capsys, monkeypatch):
    """No --checkpoint: a 14B I2V musubi LoRA (rank 1, one block) -> comfy -> kohya means what diffusers' own
    converter makes of the source; ΔW·x compared (ΔW itself would take gigabytes)."""
    gen = torch.Generator().manual_seed(7)
    save_file(rank_one_tensors(real_musubi_specs(5120, 13824, 1, image=True), gen, 4.0),
              str(tmp_path / "musubi.safetensors"))
    cli(["convert", str(tmp_path / "musubi.safetensors"), "-o", str(tmp_path / "comfy.safetensors"), "--to", "comfy"],
        capsys, monkeypatch)
    report = cli(["convert", str(tmp_path / "comfy.safetensors"), "-o", str(tmp_path / "out.safetensors"),
                  "--to", "kohya"], capsys, monkeypatch)
    assert (report["base"], report["from"]) == ("wan", "comfy")
    x = {w: torch.randn(w, generator=gen, dtype=torch.float64) for w in (5120, 13824)}
    got = applied(WanPipeline.lora_state_dict(str(tmp_path / "out.safetensors")), x)
    expected = applied(WanPipeline.lora_state_dict(str(tmp_path / "musubi.safetensors")), x)
    assert sorted(got) == sorted(expected) and len(expected) == 12
    assert all(float((got[k] - v).norm() / v.norm()) < 1e-6 for k, v in expected.items())


# -- the releases at real size (headers only) ------------------------------------------------------------------


def diffusers_shapes(config: str) -> dict[str, tuple[int, ...]]:
    """A release's diffusers state dict (meta device), its blocks cut to 2 (the width decides the size)."""
    from adapterzoo.formats.families.wan.modules import CONFIGS
    from adapterzoo.formats.model.module_tables import build_on_meta

    built = build_on_meta("WanTransformer3DModel", {**CONFIGS[config], "num_layers": 2})
    return {k: tuple(v.shape) for k, v in built.state_dict().items()}


def wan_shapes(config: str) -> dict[str, tuple[int, ...]]:
    """The same transformer in Wan's names, proven by diffusers' single-file converter (FLF2V's `img_emb.emb_pos`,
    which that converter leaves alone, aside)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    ours = diffusers_shapes(config)
    names = wan_names(ours)
    table = {names[k]: shape for k, shape in ours.items()}
    converted = convert_wan_transformer_to_diffusers({k: torch.empty(s, device="meta") for k, s in table.items()
                                                      if k != "img_emb.emb_pos"})
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: v for k, v in ours.items() if k != "condition_embedder.image_embedder.pos_embed"}
    return table


@pytest.mark.parametrize("config,prefix,name,expected", [
    ("14b", "", "wan2.1_t2v_14B_bf16.safetensors",
     {"format": "ldm", "variant": "2.1-t2v-14b", "width": 5120, "blocks": 2}),
    ("14b", "", "model.safetensors", {"format": "ldm", "variant": "t2v-14b"}),
    ("14b-i2v", LDM, "i2v.safetensors", {"format": "ldm", "variant": "2.1-i2v-14b", "in_channels": 36}),
    ("14b-flf2v", "", "x.safetensors", {"variant": "2.1-flf2v-14b"}),
    ("1.3b", "", "small.safetensors", {"variant": "2.1-t2v-1.3b", "width": 1536}),
    ("5b", "", "wan2.2_ti2v_5B_fp16.safetensors", {"variant": "2.2-ti2v-5b", "in_channels": 48}),
    ("14b-i2v-2.2", "", "wan2.2_i2v_high_noise_14B_fp16.safetensors",
     {"variant": "2.2-i2v-14b-high-noise", "expert": "high-noise"}),
    ("14b", LDM, "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", {"variant": "2.2-t2v-14b-low-noise"}),
    ("14b-i2v", "", "d.safetensors", {"format": "diffusers", "variant": "2.1-i2v-14b"}),
    ("5b", "", "d.safetensors", {"format": "diffusers", "variant": "2.2-ti2v-5b"}),
])
def test_probe_names_each_release(tmp_path, config, prefix, name, expected):
    shapes = diffusers_shapes(config) if expected.get("format") == "diffusers" else wan_shapes(config)
    found = probe(factory.write_sparse_safetensors(tmp_path / name, {prefix + k: ("BF16", s) for k, s in shapes.items()}))
    assert (found.kind, found.base) == ("checkpoint", "wan")
    assert {k: (found.format if k == "format" else found.details.get(k)) for k in expected} == expected
    hinted = "noise" in expected["variant"] or name.startswith("wan2.1_t2v")
    assert any("cannot confirm" in w for w in found.warnings) == hinted, found.warnings


def test_a_gguf_of_wan_names(tmp_path):
    """city96's Wan GGUFs: Wan's names, 5-D patch embedding stored flat with ComfyUI-GGUF's orig_shape."""
    from gguf import GGUFWriter

    from adapterzoo.formats.io.gguf_header import ORIG_SHAPE

    writer = GGUFWriter(tmp_path / "wan2.1-i2v-14b-480p-Q4_0.gguf", "wan")
    for name, shape in wan_shapes("14b-i2v").items():
        if not name.startswith(("patch_embedding", "blocks.0.cross_attn.q", "blocks.0.cross_attn.k_img",
                                "blocks.1.ffn", "head.", "img_emb.")):
            continue
        if len(shape) > 2:
            writer.add_array(ORIG_SHAPE + name, list(shape))
        writer.add_tensor(name, np.zeros((shape[0], int(np.prod(shape[1:]))) if len(shape) > 2 else shape, np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    found = probe(tmp_path / "wan2.1-i2v-14b-480p-Q4_0.gguf")
    assert (found.kind, found.base, found.format, found.details["layout"]) == ("checkpoint", "wan", "gguf", "ldm")
    assert found.details["variant"] == "2.1-i2v-14b" and found.details["in_channels"] == 36


def test_real_loras_by_names_shapes_and_metadata(tmp_path):
    def probed(name: str, specs: dict, metadata: dict | None = None):
        return probe(factory.write_sparse_safetensors(tmp_path / name, specs, metadata))

    t2v = probed("a.safetensors", real_musubi_specs(5120, 13824))
    assert (t2v.base, t2v.format, t2v.rank, t2v.details["variant"]) == ("wan", "kohya", 4, "14b") and not t2v.warnings
    i2v = probed("b.safetensors", real_musubi_specs(5120, 13824, image=True))
    assert i2v.details["variant"] == "2.1-i2v-14b"
    small = probed("c.safetensors", real_musubi_specs(1536, 8960))
    assert small.details["variant"] == "2.1-1.3b"
    cross = probed("d.safetensors", {k: v for k, v in real_musubi_specs(3072, 14336).items() if "cross_attn" in k})
    assert cross.details["variant"] == "2.2-5b" and cross.details["coverage"]["cross_attention"]
    low = probed("e.safetensors", real_musubi_specs(5120, 13824), {"ss_output_name": "myface_wan22_low_noise"})
    assert low.details["variant"] == "2.2-14b-low-noise" and any("cannot confirm" in w for w in low.warnings)
    patched = {**real_musubi_specs(5120, 13824, 1), "lora_unet_patch_embedding.lora_down.weight": ("BF16", (4, 16, 1, 2, 2)),
               "lora_unet_patch_embedding.lora_up.weight": ("BF16", (5120, 4, 1, 1, 1)),
               "lora_unet_patch_embedding.alpha": ("F32", ())}
    t2v = probed("g.safetensors", patched)  # a T2V's patch embedding (16 channels): read against 2.1 T2V's table
    assert t2v.details["variant"] == "t2v-14b"
    assert load_lora(tmp_path / "g.safetensors").modules["transformer.patch_embedding"].delta().shape[1] == 16
    peft = {f"base_model.model.blocks.{n}.attn2.{m}.lora_{p}.weight": ("BF16", (4, 5120) if p == "A" else (5120, 4))
            for n in range(2) for m in ("to_q", "add_k_proj") for p in "AB"}
    found = probed("f.safetensors", peft)
    assert (found.base, found.format, found.details["variant"]) == ("wan", "peft", "2.1-i2v-14b")


def test_a_civitai_label_of_another_size_is_a_warning():
    from adapterzoo.zoo.stated import disagreements

    assert disagreements("wan", "Wan Video 1.3B t2v", "wan", {"size": "14b"}) == [
        "the source says Wan Video 1.3B t2v (size 1.3b) but the file is size 14b"]
    assert disagreements("wan", "Wan Video 2.2 TI2V-5B", "wan", {"size": "5b"}) == []
    assert disagreements("wan", "Wan Video", "wan", {"size": "5b"}) == []


def test_other_families_blocks_are_not_wan(tmp_path):
    """SD's `transformer_blocks.N.attn1` and Flux's `single_blocks` are not Wan's top-level `blocks`."""
    def lora(name: str, modules: dict, spell) -> str:
        specs = {}
        for module, (out, inp) in modules.items():
            specs |= {f"{spell(module)}.lora_A.weight": ("BF16", (4, inp)),
                      f"{spell(module)}.lora_B.weight": ("BF16", (out, 4))}
        return probe(factory.write_sparse_safetensors(tmp_path / name, specs)).base

    sd = {f"down_blocks.1.attentions.0.transformer_blocks.{n}.attn1.to_q": (640, 640) for n in range(2)}
    assert lora("s.safetensors", sd, lambda m: f"unet.{m}") != "wan"
    flux = {f"single_blocks.{n}.linear1": (21504, 3072) for n in range(2)}
    assert lora("f.safetensors", flux, lambda m: f"diffusion_model.{m}") != "wan"
    cosmos = {f"blocks.{n}.{m}": (2048, 2048) for n in range(2) for m in ("self_attn.q_proj", "cross_attn.k_proj")}
    assert lora("c.safetensors", cosmos, lambda m: f"diffusion_model.{m}") != "wan"  # Cosmos Predict2's names


def test_the_table_written_out_is_diffusers_own(model):
    from adapterzoo.formats.families.wan.modules import CONFIGS, module_table
    from adapterzoo.formats.model.module_tables import build_on_meta, table_of

    for name in ("14b-flf2v", "14b-i2v-2.2", "5b"):
        small = {**CONFIGS[name], "num_layers": 2}
        assert module_table(small).modules == table_of(build_on_meta("WanTransformer3DModel", small)).modules
    assert module_table(dict(model.config)).modules == table_of(model).modules


def test_a_2_2_pipeline_folder_names_both_experts_and_merges_into_one(tmp_path, folder, musubi, capsys, monkeypatch):
    for part in ("transformer", "transformer_2"):
        shutil.copytree(folder, tmp_path / part)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": [
        "diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    found = probe(tmp_path)
    assert (found.kind, found.base, found.details["version"]) == ("checkpoint", "wan", "2.2")
    assert found.details["experts"] == ["high-noise", "low-noise"]
    assert probe(folder).details["variant"] == "2.1-i2v"  # a transformer folder: 36 channels, 2.1's image encoder
    err = refused(["merge", str(tmp_path), "--lora", str(musubi), "-o", str(tmp_path / "m")], capsys, monkeypatch)
    assert "two experts" in err and "transformer_2" in err and not (tmp_path / "m").exists()
    report = cli(["merge", str(tmp_path / "transformer_2"), "--lora", str(musubi), "-o", str(tmp_path / "low")],
                 capsys, monkeypatch)
    assert report["base"] == "wan" and (tmp_path / "low").is_dir()


# -- checkpoints, merge, extract, resize ----------------------------------------------------------------------


def wan_state_dict(model) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = model.state_dict()
    names = wan_names(sd)
    out = {names[k]: v for k, v in sd.items()}
    back = convert_wan_transformer_to_diffusers(dict(out))
    assert sorted(back) == sorted(sd) and all(back[k] is sd[k] for k in sd)  # diffusers' own converter agrees
    return out


def wan_names(sd: dict) -> dict[str, str]:
    """diffusers key -> Wan key, by the renames above."""
    out = {}
    table = {**RENAMED, "norm3": "norm2", "modulation": "scale_shift_table", "self_attn.norm_q": "attn1.norm_q",
             "self_attn.norm_k": "attn1.norm_k", "cross_attn.norm_q": "attn2.norm_q",
             "cross_attn.norm_k": "attn2.norm_k", "cross_attn.norm_k_img": "attn2.norm_added_k"}
    top = {**TOP, "head.modulation": "scale_shift_table", "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
           "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
           "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}
    for key in sd:
        name = key
        if key.startswith("blocks."):
            _, n, rest = key.split(".", 2)
            for wan, ours in table.items():
                if rest.startswith(ours + ".") or rest == ours:
                    name = f"blocks.{n}.{wan}{rest[len(ours):]}"
                    break
        else:
            for wan, ours in top.items():
                if key.startswith(ours + ".") or key == ours:
                    name = wan + key[len(ours):]
                    break
        out[key] = name
    return out


def test_comfy_file_to_folder_and_back(tmp_path, model, capsys, monkeypatch):
    wan = wan_state_dict(model)
    save_file({LDM + k: v for k, v in wan.items()}, str(tmp_path / "w.safetensors"))
    report = cli(["convert", str(tmp_path / "w.safetensors"), "-o", str(tmp_path / "folder"), "--to", "diffusers"],
                 capsys, monkeypatch)
    assert (report["base"], report["dropped"]) == ("wan", 0)
    assert_same_model(WanTransformer3DModel.from_pretrained(tmp_path / "folder"), model)
    cli(["convert", str(tmp_path / "folder"), "-o", str(tmp_path / "back.safetensors"), "--to", "ldm"], capsys, monkeypatch)
    assert_same_tensors(load_file(tmp_path / "back.safetensors"), wan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_a_comfy_file_and_a_folder_is_w_plus_delta(tmp_path, model, folder, factors, musubi, dtype,
                                                              capsys, monkeypatch):
    deltas = {f"{p.removeprefix('transformer.')}.weight": d for p, d in layout_deltas(factors, mapping(factors)).items()}
    names = wan_names(model.state_dict())
    expected = {names[k]: v.to(dtype).double() + deltas.get(k, 0) for k, v in model.state_dict().items()}
    save_file({k: v.to(dtype) for k, v in wan_state_dict(model).items()}, str(tmp_path / "w.safetensors"))
    report = cli(["merge", str(tmp_path / "w.safetensors"), "--lora", str(musubi), "-o", str(tmp_path / "m.safetensors")],
                 capsys, monkeypatch)
    assert (report["base"], report["layout"]) == ("wan", "single-file")
    got = load_file(tmp_path / "m.safetensors")
    tolerance = {"atol": 1e-5, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-7, "rtol": 2 ** -7}
    assert sorted(got) == sorted(expected) and all(got[k].dtype == dtype for k in got)
    assert all(torch.allclose(got[k].double(), v, **tolerance) for k, v in expected.items())
    if dtype == torch.float32:
        report = cli(["merge", str(folder), "--lora", str(musubi), "-o", str(tmp_path / "merged")], capsys, monkeypatch)
        assert (report["base"], report["layout"]) == ("wan", "diffusers")
        merged = WanTransformer3DModel.from_pretrained(tmp_path / "merged").state_dict()
        assert all(torch.allclose(merged[k].double(), expected[names[k]], atol=1e-5, rtol=0) for k in merged)


def test_extract_and_resize(tmp_path, model, arch, factors, musubi, capsys, monkeypatch):
    """extract between a file and its merge gives the LoRA back in musubi's names; resize keeps the best rank-2 fit."""
    base = tmp_path / "base.safetensors"
    save_file(wan_state_dict(model), str(base))
    cli(["merge", str(base), "--lora", str(musubi), "-o", str(tmp_path / "tuned.safetensors")], capsys, monkeypatch)
    report = cli(["extract", str(base), str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                  "--rank", "8"], capsys, monkeypatch)
    assert report["model"] == "wan"
    assert sorted(k.split(".")[0] for k in load_file(tmp_path / "x.safetensors") if k.endswith(".alpha")) == \
        sorted("lora_unet_" + n.replace(".", "_") for n in OURS)
    assert_same_deltas(load_lora(tmp_path / "x.safetensors", architecture=arch),
                       layout_deltas(factors, mapping(factors)), rtol=1e-5)
    cli(["resize", str(musubi), "-o", str(tmp_path / "r.safetensors"), "--rank", "2"], capsys, monkeypatch)
    assert_best_rank(kohya_deltas(load_file(musubi)), kohya_deltas(load_file(tmp_path / "r.safetensors")), 2)


def test_a_lora_of_another_size_is_refused_in_one_line(tmp_path, folder, capsys, monkeypatch):
    """A real-size 1.3B LoRA onto the tiny transformer: refused by shape, nothing written."""
    gen = torch.Generator().manual_seed(8)
    save_file(rank_one_tensors(real_musubi_specs(1536, 8960, 1), gen, 1.0), str(tmp_path / "big.safetensors"))
    err = refused(["merge", str(folder), "--lora", str(tmp_path / "big.safetensors"), "-o", str(tmp_path / "m")],
                  capsys, monkeypatch)
    assert "1536" in err and not (tmp_path / "m").exists()


# -- 2.2's experts: the same tensors, told apart by names alone ------------------------------------------------


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """A tiny 2.2-like T2V transformer (no image attention, so the weights leave the version open) as a ComfyUI
    file named for the low-noise expert, and one LoRA on its block's Linears three ways: named for the high-noise
    expert, told low-noise by musubi's metadata, and silent; the transformer as both experts of a 2.2 pipeline folder.
    Returns (checkpoint, {name: LoRA}, W + ΔW in Wan's names, pipeline folder)."""
    torch.manual_seed(1)
    t2v = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=D, in_channels=OUT,
                                out_channels=OUT, text_dim=TEXT, freq_dim=32, ffn_dim=FFN, num_layers=1).eval()
    where = tmp_path_factory.mktemp("experts")
    ckpt = where / "wan2.2_t2v_low_noise_tiny.safetensors"
    save_file(wan_state_dict(t2v), str(ckpt))
    for part in ("transformer", "transformer_2"):
        t2v.save_pretrained(where / "pipe" / part)
    (where / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": [
        "diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    block = {wan: shape_of(t2v, ours) for wan, ours in OURS.items() if wan.startswith("blocks.0.") and "img" not in wan}
    factors = random_factors(block, seed=11)
    loras = {name: write_layout_lora(where / name, factors, lambda p: "lora_unet_" + p.replace(".", "_"), "lora_down",
                                     "lora_up", alpha=True) for name in ("myface_high_noise.safetensors", "silent.safetensors")}
    loras["told.safetensors"] = where / "told.safetensors"
    save_file(load_file(loras["silent.safetensors"]), str(loras["told.safetensors"]),
              {"ss_output_name": "myface_wan22_low_noise"})
    deltas = {f"{p.removeprefix('transformer.')}.weight": d for p, d in layout_deltas(factors, mapping(factors)).items()}
    names = wan_names(t2v.state_dict())
    return ckpt, loras, {names[k]: v.double() + deltas.get(k, 0) for k, v in t2v.state_dict().items()}, where / "pipe"


def test_a_lora_of_the_other_expert_is_refused_by_its_name(tmp_path, experts, capsys, monkeypatch):
    """A high-noise LoRA into the low-noise checkpoint (each said by its file name): one line naming both files, what
    each says and where, nothing written; --allow-variant-mismatch merges W + ΔW with that line as a warning."""
    ckpt, loras, expected, _ = experts
    high = loras["myface_high_noise.safetensors"]
    found = probe(high)
    assert (found.details["expert"], found.details["read_from"]) == ("high-noise", {"expert": "file name",
                                                                                   "version": "file name"})
    out = tmp_path / "m.safetensors"
    err = refused(["merge", str(ckpt), "--lora", str(high), "-o", str(out)], capsys, monkeypatch)
    assert err == (f"error: {ckpt.name} declares Wan expert low-noise (read from its file name) but {high.name} "
                   "declares expert high-noise (read from its file name); the two have the same tensor names and "
                   "shapes, so only these names tell them apart (--allow-variant-mismatch merges them anyway)")
    assert not out.exists() and not list(tmp_path.iterdir())
    report = cli(["merge", str(ckpt), "--lora", str(high), "-o", str(out), "--allow-variant-mismatch"],
                 capsys, monkeypatch)
    assert report["warnings"] == [err.removeprefix("error: ").replace(
        " (--allow-variant-mismatch merges them anyway)", ": merged anyway (--allow-variant-mismatch)")]
    got = load_file(out)
    assert sorted(got) == sorted(expected)
    assert all(torch.allclose(got[k].double(), v, atol=1e-6, rtol=0) for k, v in expected.items())


def test_experts_agreeing_or_unsaid_merge_and_two_loras_of_both_are_refused(tmp_path, experts, capsys, monkeypatch):
    """The low-noise LoRA (by metadata) into the low-noise checkpoint, and a silent LoRA, merge without a word;
    merge-loras refuses the high- and low-noise LoRAs together (names and metadata) unless told."""
    ckpt, loras, expected, _ = experts
    for name in ("told.safetensors", "silent.safetensors"):
        report = cli(["merge", str(ckpt), "--lora", str(loras[name]), "-o", str(tmp_path / name)], capsys, monkeypatch)
        assert report["warnings"] == []
        got = load_file(tmp_path / name)
        assert all(torch.allclose(got[k].double(), v, atol=1e-6, rtol=0) for k, v in expected.items())
    assert probe(tmp_path / "silent.safetensors").details["expert"] == "low-noise"  # its provenance names the input
    high, told, silent = (loras[n] for n in ("myface_high_noise.safetensors", "told.safetensors", "silent.safetensors"))
    shutil.copy(ckpt, tmp_path / "w.safetensors")
    err = refused(["merge", str(tmp_path / "w.safetensors"), "--lora", str(high), "--lora", str(told), "-o",
                   str(tmp_path / "both.safetensors")], capsys, monkeypatch)
    assert f"{high.name} declares Wan expert high-noise (read from its file name) but {told.name} declares" in err
    out = tmp_path / "pair.safetensors"
    pair = ["merge-loras", str(silent), str(high), str(told), "-o", str(out), "--checkpoint", str(ckpt)]
    err = refused(pair, capsys, monkeypatch)
    assert "expert low-noise (read from its metadata (ss_output_name))" in err and not out.exists()
    report = cli([*pair, "--allow-variant-mismatch"], capsys, monkeypatch)
    assert report["warnings"][0].endswith("merged anyway (--allow-variant-mismatch)") and out.is_file()


def test_a_2_2_pipeline_folders_transformer_2_is_the_low_noise_expert(tmp_path, experts, capsys, monkeypatch):
    """Named alone, as the refusal of the two-expert folder asks: `transformer_2` is low-noise by its place (diffusers'
    WanPipeline runs it below the boundary), so the high-noise LoRA is refused there in one line."""
    _, loras, _, pipe = experts
    assert probe(pipe / "transformer").details["expert"] == "high-noise"
    high = loras["myface_high_noise.safetensors"]
    err = refused(["merge", str(pipe / "transformer_2"), "--lora", str(high), "-o", str(tmp_path / "m")],
                  capsys, monkeypatch)
    assert err.startswith("error: transformer_2 declares Wan expert low-noise (read from its place in pipe "
                          f"(transformer_2)) but {high.name} declares expert high-noise") and not (tmp_path / "m").exists()
