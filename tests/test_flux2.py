"""Flux.2 (issue 17): LoRAs of every dialect in and out, checkpoints both ways, merge, and the releases told apart.
Oracles: diffusers' own Flux.2 converters and loader (`Flux2Pipeline.lora_state_dict` + `load_lora_into_transformer`
on a tiny `Flux2Transformer2DModel`), its checkpoint converter, and ΔW in plain torch through the BFL rows written
out below from BFL's flux2 model.py (never adapterzoo's table)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import factory
import pytest
import torch
from deltas import kohya_deltas
from diffusers import Flux2Pipeline, Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from layout_checks import (
    assert_close_deltas,
    assert_same_deltas,
    cli,
    converted_deltas,
    layout_deltas,
    loaded_deltas,
    random_factors,
    refused,
    rows,
    split_factors,
    write_layout_lora,
)
from safetensors.torch import load_file, save_file

from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.model.architectures import architecture_from_models
from adapterzoo.formats.probe import probe

H, M, IN, JOINT, TIME = 32, 96, 8, 24, 32  # 2 heads x 16, MLP ratio 3, one double and one single block
B, S = "transformer_blocks.0", "single_transformer_blocks.0"
# BFL Linear -> the diffusers rows it holds (flux2 model.py; diffusers' convert_flux2_transformer_checkpoint_to_diffusers)
MAPPING = {
    "img_in": rows(("x_embedder", H)), "txt_in": rows(("context_embedder", H)),
    "time_in.in_layer": rows(("time_guidance_embed.timestep_embedder.linear_1", H)),
    "time_in.out_layer": rows(("time_guidance_embed.timestep_embedder.linear_2", H)),
    "guidance_in.in_layer": rows(("time_guidance_embed.guidance_embedder.linear_1", H)),
    "double_stream_modulation_img.lin": rows(("double_stream_modulation_img.linear", 6 * H)),
    "double_stream_modulation_txt.lin": rows(("double_stream_modulation_txt.linear", 6 * H)),
    "single_stream_modulation.lin": rows(("single_stream_modulation.linear", 3 * H)),
    "double_blocks.0.img_attn.qkv": rows((f"{B}.attn.to_q", H), (f"{B}.attn.to_k", H), (f"{B}.attn.to_v", H)),
    "double_blocks.0.txt_attn.qkv": rows((f"{B}.attn.add_q_proj", H), (f"{B}.attn.add_k_proj", H),
                                         (f"{B}.attn.add_v_proj", H)),
    "double_blocks.0.img_attn.proj": rows((f"{B}.attn.to_out.0", H)),
    "double_blocks.0.txt_attn.proj": rows((f"{B}.attn.to_add_out", H)),
    "double_blocks.0.img_mlp.0": rows((f"{B}.ff.linear_in", 2 * M)),
    "double_blocks.0.img_mlp.2": rows((f"{B}.ff.linear_out", H)),
    "double_blocks.0.txt_mlp.0": rows((f"{B}.ff_context.linear_in", 2 * M)),
    "double_blocks.0.txt_mlp.2": rows((f"{B}.ff_context.linear_out", H)),
    "single_blocks.0.linear1": rows((f"{S}.attn.to_qkv_mlp_proj", 3 * H + 2 * M)),
    "single_blocks.0.linear2": rows((f"{S}.attn.to_out", H)),
    "final_layer.linear": rows(("proj_out", IN)),
    # BFL (shift, scale) against diffusers (scale, shift): the halves trade places
    "final_layer.adaLN_modulation.1": [("norm_out.linear", H, 2 * H), ("norm_out.linear", 0, H)],
}
IN_DIMS = {"img_in": IN, "txt_in": JOINT, "time_in.in_layer": TIME, "guidance_in.in_layer": TIME,
           "double_blocks.0.img_mlp.2": M, "double_blocks.0.txt_mlp.2": M, "single_blocks.0.linear2": H + M}
SHAPES = {name: (max(hi for _, _, hi in parts), IN_DIMS.get(name, H)) for name, parts in MAPPING.items()}
# what diffusers 0.42's kohya converter for Flux.2 reads (it logs the rest as unsupported)
KOHYA_READ = [n for n in MAPPING if n.startswith(("double_blocks", "single_blocks"))] + [
    "img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "final_layer.linear"]


def flat(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def bfl(name: str) -> str:
    return "diffusion_model." + name


@pytest.fixture(scope="module")
def model() -> Flux2Transformer2DModel:
    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=IN, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT,
                                   timestep_guidance_channels=TIME, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=True).eval()


@pytest.fixture(scope="module")
def arch(model):
    return architecture_from_models("flux2", {"transformer": model})


@pytest.fixture(scope="module")
def factors():
    return random_factors(SHAPES, seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("flux2") / "transformer"
    model.save_pretrained(path)
    return path


def load_into(state_dict: dict, transformer) -> None:
    Flux2Pipeline.load_lora_into_transformer(state_dict, transformer=transformer)


# -- reading every dialect ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["ai-toolkit", "comfy-alpha", "musubi", "diffusers"])
def test_every_dialect_reads_the_bfl_rows_exactly(tmp_path, arch, factors, dialect):
    path = tmp_path / f"{dialect}.safetensors"
    if dialect == "ai-toolkit":  # diffusion_model.<BFL name>.lora_A/B, no alpha: scale 1
        write_layout_lora(path, factors, bfl)
        expected = layout_deltas(factors, MAPPING, scaled=False)
    elif dialect == "comfy-alpha":
        write_layout_lora(path, factors, bfl, "lora_down", "lora_up", alpha=True)
        expected = layout_deltas(factors, MAPPING)
    elif dialect == "musubi":  # lora_unet_double_blocks_0_img_attn_qkv with alpha
        write_layout_lora(path, factors, flat, "lora_down", "lora_up", alpha=True)
        expected = layout_deltas(factors, MAPPING)
    else:  # transformer.<diffusers module>: q, k, v split, the final modulation's halves swapped back
        write_layout_lora(path, split_factors(factors, MAPPING), lambda p: f"transformer.{p}", alpha=True)
        expected = layout_deltas(factors, MAPPING)
    lora = load_lora(path, architecture=arch)
    assert probe(path).format == {"ai-toolkit": "bfl", "comfy-alpha": "bfl", "musubi": "kohya"}.get(dialect, "diffusers")
    assert_same_deltas(lora, expected)


def test_lokr_on_bfl_and_diffusers_names_reads_its_rows(tmp_path, arch):
    """ai-toolkit's LoKr on the fused qkv (diffusers can only fuse the model to load it) and LyCORIS's on to_q."""
    gen = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(4, 2, generator=gen), torch.randn(24, 16, generator=gen)
    q1, q2 = torch.randn(2, 4, generator=gen), torch.randn(16, 8, generator=gen)
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": w1,
               "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": w2,
               "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(1.0)}, str(tmp_path / "a.safetensors"))
    save_file({"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": q1, "lycoris_transformer_blocks_0_attn_to_q.lokr_w2": q2},
              str(tmp_path / "b.safetensors"))
    fused = torch.kron(w1.double(), w2.double())
    assert probe(tmp_path / "a.safetensors").kind == "lycoris"
    assert_same_deltas(load_lora(tmp_path / "a.safetensors", architecture=arch),
                       {f"transformer.{B}.attn.to_{x}": fused[i * H:(i + 1) * H] for i, x in enumerate("qkv")})
    assert_same_deltas(load_lora(tmp_path / "b.safetensors", architecture=arch),
                       {f"transformer.{B}.attn.to_q": torch.kron(q1.double(), q2.double())})


# -- writing every dialect, read back by diffusers ------------------------------------------------------------


@pytest.fixture(scope="module")
def musubi(tmp_path_factory, factors) -> Path:
    return write_layout_lora(tmp_path_factory.mktemp("src") / "musubi.safetensors", factors, flat, "lora_down",
                             "lora_up", alpha=True)


def test_diffusers_output_loads_in_diffusers_with_the_bfl_delta(tmp_path, model, folder, factors, musubi,
                                                                capsys, monkeypatch):
    """musubi -> diffusers through the CLI: diffusers' loader patches every module with the reference ΔW; what its
    own kohya converter reads from the source agrees on every module it reads."""
    expected = layout_deltas(factors, MAPPING)
    dest = tmp_path / "out.safetensors"
    report = cli(["convert", str(musubi), "-o", str(dest), "--to", "diffusers", "--checkpoint", str(folder)],
                 capsys, monkeypatch)
    assert (report["base"], report["from"], report["modules"]) == ("flux2", "kohya", len(expected))
    assert_close_deltas(loaded_deltas(model, Flux2Pipeline.lora_state_dict(str(dest)), load_into), expected)
    theirs = converted_deltas(Flux2Pipeline.lora_state_dict(str(musubi)))
    read = [p for name in KOHYA_READ for p in {f"transformer.{path}" for path, _, _ in MAPPING[name]}]
    assert_close_deltas(theirs, {p: expected[p] for p in read})


@pytest.mark.parametrize("to", ["kohya", "bfl", "comfy"])
def test_bfl_and_kohya_outputs_fuse_back_exactly_and_diffusers_reads_them(tmp_path, arch, folder, factors, to, capsys,
                                                                          monkeypatch):
    """diffusers-named split modules -> kohya / bfl (fused qkv): the same ΔW read by us, and by diffusers' own
    converters on what they read (its BFL converter keeps the final modulation's halves unswapped: a bug its
    checkpoint converter does not have, so that module is checked against the swap)."""
    expected = layout_deltas(factors, MAPPING)
    split = write_layout_lora(tmp_path / "split.safetensors", split_factors(factors, MAPPING),
                              lambda p: f"transformer.{p}", alpha=True)
    dest = tmp_path / f"{to}.safetensors"
    cli(["convert", str(split), "-o", str(dest), "--to", to, "--checkpoint", str(folder)], capsys, monkeypatch)
    written = load_file(dest)
    if to == "kohya":
        assert sorted({k.split(".")[0] for k in written}) == sorted(flat(n) for n in MAPPING)
    else:
        assert sorted({k.rsplit(".", 2)[0] for k in written}) == sorted(bfl(n) for n in MAPPING)
        assert not any(k.endswith(".alpha") for k in written)
    assert_same_deltas(load_lora(dest, architecture=arch), expected)
    theirs = converted_deltas(Flux2Pipeline.lora_state_dict(str(dest)))
    if to == "kohya":
        expected = {p: expected[p] for name in KOHYA_READ for p in {f"transformer.{x}" for x, _, _ in MAPPING[name]}}
    else:
        expected = dict(expected)
        expected["transformer.norm_out.linear"] = torch.cat(expected["transformer.norm_out.linear"].chunk(2)[::-1])
    assert_close_deltas(theirs, expected)


def test_peft_output_loads_in_peft(tmp_path, model, folder, factors, musubi, capsys, monkeypatch):
    from peft import PeftModel

    cli(["convert", str(musubi), "-o", str(tmp_path / "peft"), "--to", "peft", "--checkpoint", str(folder)],
        capsys, monkeypatch)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    got = {f"transformer.{name.removeprefix('base_model.model.')}": m.get_delta_weight("default").double()
           for name, m in loaded.named_modules() if hasattr(m, "get_delta_weight") and m.active_adapters}
    assert_close_deltas(got, layout_deltas(factors, MAPPING))


# -- the releases told apart, at their real sizes (headers only) ---------------------------------------------

REAL = {"dev": (6144, 8, 48), "klein-9b": (4096, 8, 24), "klein-4b": (3072, 5, 20)}  # width, double, single blocks


def real_lora_specs(variant: str, rank: int = 4, attention_only: bool = False, blocks: int | None = None) -> dict:
    """A musubi-style LoRA header of a release: every double block's attention (and MLP), every single block."""
    h, double, single = REAL[variant]
    specs = {}

    def add(name: str, out: int, inp: int) -> None:
        specs[f"{flat(name)}.lora_down.weight"] = ("BF16", (rank, inp))
        specs[f"{flat(name)}.lora_up.weight"] = ("BF16", (out, rank))
        specs[f"{flat(name)}.alpha"] = ("F32", ())

    for n in range(double if blocks is None else blocks):
        for stream in ("img", "txt"):
            add(f"double_blocks.{n}.{stream}_attn.qkv", 3 * h, h)
            add(f"double_blocks.{n}.{stream}_attn.proj", h, h)
            if not attention_only:
                add(f"double_blocks.{n}.{stream}_mlp.0", 6 * h, h)
                add(f"double_blocks.{n}.{stream}_mlp.2", h, 3 * h)
    for n in range(0 if attention_only else single):
        add(f"single_blocks.{n}.linear1", 9 * h, h)
        add(f"single_blocks.{n}.linear2", h, 4 * h)
    return specs


@pytest.mark.parametrize("variant", REAL)
def test_probe_names_each_release_from_the_header(tmp_path, variant):
    found = probe(factory.write_sparse_safetensors(tmp_path / "l.safetensors", real_lora_specs(variant)))
    _, double, single = REAL[variant]
    assert (found.kind, found.base, found.format, found.details["variant"]) == ("lora", "flux2", "kohya", variant)
    coverage = found.details["coverage"]
    assert (coverage["double_blocks"], coverage["single_blocks"]) == (list(range(double)), list(range(single)))
    assert "also_fits" not in found.details and not found.warnings


def test_a_klein_lora_does_not_fit_another_release(tmp_path, capsys, monkeypatch):
    """Klein 9B weights (a sparse file, the real shapes) refuse a Klein 4B LoRA in one line, before writing."""
    h, double, single = REAL["klein-9b"]
    specs = {"model.diffusion_model." + k: v for k, v in real_checkpoint_specs(h, double, single).items()}
    checkpoint = factory.write_sparse_safetensors(tmp_path / "klein9b.safetensors", specs)
    assert probe(checkpoint).details["variant"] == "klein-9b"
    lora = factory.write_sparse_safetensors(tmp_path / "klein4b.safetensors", real_lora_specs("klein-4b"))
    err = refused(["merge", str(checkpoint), "--lora", str(lora), "-o", str(tmp_path / "m.safetensors")],
                  capsys, monkeypatch)
    assert "klein-4b" in err and "klein-9b" in err and not (tmp_path / "m.safetensors").exists()


def real_checkpoint_specs(h: int, double: int, single: int, guidance: bool = False) -> dict:
    """The BFL tensors of a Flux.2 transformer (flux2 model.py), bf16, no biases."""
    specs = {"img_in.weight": (h, 128), "txt_in.weight": (h, {3072: 7680, 4096: 12288}.get(h, 15360)),
             "time_in.in_layer.weight": (h, 256), "time_in.out_layer.weight": (h, h),
             "double_stream_modulation_img.lin.weight": (6 * h, h), "double_stream_modulation_txt.lin.weight": (6 * h, h),
             "single_stream_modulation.lin.weight": (3 * h, h), "final_layer.linear.weight": (128, h),
             "final_layer.adaLN_modulation.1.weight": (2 * h, h)}
    if guidance:
        specs |= {"guidance_in.in_layer.weight": (h, 256), "guidance_in.out_layer.weight": (h, h)}
    for n in range(double):
        for stream in ("img", "txt"):
            d = f"double_blocks.{n}.{stream}"
            specs |= {f"{d}_attn.qkv.weight": (3 * h, h), f"{d}_attn.proj.weight": (h, h),
                      f"{d}_attn.norm.query_norm.scale": (128,), f"{d}_attn.norm.key_norm.scale": (128,),
                      f"{d}_mlp.0.weight": (6 * h, h), f"{d}_mlp.2.weight": (h, 3 * h)}
    for n in range(single):
        s = f"single_blocks.{n}"
        specs |= {f"{s}.linear1.weight": (9 * h, h), f"{s}.linear2.weight": (h, 4 * h),
                  f"{s}.norm.query_norm.scale": (128,), f"{s}.norm.key_norm.scale": (128,)}
    return {k: ("BF16", v) for k, v in specs.items()}


def test_a_klein_4b_attention_lora_fits_flux1_too_and_metadata_decides(tmp_path):
    """Klein 4B is as wide as Flux.1: a LoRA of the first five double blocks' attention alone fits both (and
    Chroma). Flux.1 claims it and says so; musubi's ss_base_model_version makes it Flux.2's."""
    specs = real_lora_specs("klein-4b", attention_only=True)
    found = probe(factory.write_sparse_safetensors(tmp_path / "a.safetensors", specs))
    assert (found.base, found.details["also_fits"]) == ("flux", ["flux2", "chroma"])
    assert any("cannot tell" in w for w in found.warnings)
    hinted = probe(factory.write_sparse_safetensors(tmp_path / "b.safetensors", specs,
                                                    {"ss_base_model_version": "flux_2_klein_4b"}))
    assert (hinted.base, hinted.details["variant"], hinted.details["also_fits"]) == ("flux2", "klein-4b",
                                                                                      ["flux", "chroma"])


def test_metadata_that_names_another_release_is_a_warning(tmp_path):
    found = probe(factory.write_sparse_safetensors(tmp_path / "l.safetensors", real_lora_specs("klein-9b"),
                                                   {"modelspec.architecture": "Flux.2-klein-4b/lora"}))
    assert (found.base, found.details["variant"]) == ("flux2", "klein-9b")
    assert any("metadata says Flux.2 klein-4b" in w for w in found.warnings)


def test_flux1_lora_is_still_flux1(tmp_path):
    """Flux.1's real kohya keys (InvokeAI's list): not Flux.2, nothing else fits them."""
    import gzip

    keys = json.loads(gzip.decompress((Path(__file__).parent / "fixtures" / "flux_keys" /
                                       "flux_lora_kohya_format.json.gz").read_bytes()))
    found = probe(factory.write_sparse_safetensors(tmp_path / "f.safetensors",
                                                   {k: ("F16", tuple(v)) for k, v in keys.items()}))
    assert found.base == "flux" and "also_fits" not in found.details


# -- checkpoints both ways --------------------------------------------------------------------------------------


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Flux2Transformer2DModel state dict -> BFL names, through MAPPING and the norms, written out here."""
    out = {}
    for name, parts in MAPPING.items():
        if name == "final_layer.adaLN_modulation.1":
            scale, shift = sd["norm_out.linear.weight"].chunk(2)
            out[f"{name}.weight"] = torch.cat([shift, scale])
            continue
        out[f"{name}.weight"] = torch.cat([sd[f"{path}.weight"] for path, _, _ in parts])
    out["guidance_in.out_layer.weight"] = sd["time_guidance_embed.guidance_embedder.linear_2.weight"]
    for bfl_name, ours in {"img_attn.norm.query_norm": "norm_q", "img_attn.norm.key_norm": "norm_k",
                           "txt_attn.norm.query_norm": "norm_added_q", "txt_attn.norm.key_norm": "norm_added_k"}.items():
        out[f"double_blocks.0.{bfl_name}.scale"] = sd[f"{B}.attn.{ours}.weight"]
    out["single_blocks.0.norm.query_norm.scale"] = sd[f"{S}.attn.norm_q.weight"]
    out["single_blocks.0.norm.key_norm.scale"] = sd[f"{S}.attn.norm_k.weight"]
    return out


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_file_to_folder_and_back(tmp_path, model, prefix, capsys, monkeypatch):
    sd = model.state_dict()
    src = tmp_path / "flux2.safetensors"
    save_file({prefix + k: v for k, v in to_bfl(sd).items()}, str(src))
    found = probe(src)
    assert (found.kind, found.base, found.format) == ("checkpoint", "flux2", "ldm")
    report = cli(["convert", str(src), "-o", str(tmp_path / "folder"), "--to", "diffusers"], capsys, monkeypatch)
    assert (report["base"], report["dropped"]) == ("flux2", 0)
    loaded = Flux2Transformer2DModel.from_pretrained(tmp_path / "folder").state_dict()
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(to_bfl(sd))
    assert sorted(loaded) == sorted(sd) == sorted(theirs)
    assert all(torch.equal(loaded[k], sd[k]) and torch.equal(theirs[k], sd[k]) for k in sd)
    assert probe(tmp_path / "folder").base == "flux2"
    cli(["convert", str(tmp_path / "folder"), "-o", str(tmp_path / "back.safetensors"), "--to", "ldm"], capsys, monkeypatch)
    back, reference = load_file(tmp_path / "back.safetensors"), to_bfl(sd)
    assert sorted(back) == sorted(reference) and all(torch.equal(back[k], reference[k]) for k in reference)


# -- merge, merge-loras, resize, extract ----------------------------------------------------------------------


def merged_bfl(model, deltas: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The BFL file of the model with every ΔW added (float64 of the `dtype`-rounded weights)."""
    sd = {k: v.to(dtype).double() for k, v in model.state_dict().items()}
    for path, delta in deltas.items():
        key = f"{path.removeprefix('transformer.')}.weight"
        sd[key] = sd[key] + delta
    return to_bfl(sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_a_bfl_file_is_w_plus_delta(tmp_path, model, factors, musubi, dtype, capsys, monkeypatch):
    src = tmp_path / "flux2.safetensors"
    save_file({k: v.to(dtype) for k, v in to_bfl(model.state_dict()).items()}, str(src))
    report = cli(["merge", str(src), "--lora", f"{musubi}:0.5", "-o", str(tmp_path / "m.safetensors")],
                 capsys, monkeypatch)
    assert (report["base"], report["layout"]) == ("flux2", "single-file")
    got = load_file(tmp_path / "m.safetensors")
    expected = merged_bfl(model, {p: 0.5 * d for p, d in layout_deltas(factors, MAPPING).items()}, dtype)
    assert sorted(got) == sorted(expected) and all(v.dtype == dtype for v in got.values())
    tolerance = {"atol": 1e-5, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-7, "rtol": 2 ** -7}
    assert all(torch.allclose(got[k].double(), v, **tolerance) for k, v in expected.items())


def test_merge_into_a_folder_is_w_plus_delta(tmp_path, model, folder, factors, musubi, capsys, monkeypatch):
    report = cli(["merge", str(folder), "--lora", str(musubi), "-o", str(tmp_path / "merged")], capsys, monkeypatch)
    assert (report["base"], report["layout"]) == ("flux2", "diffusers")
    merged = Flux2Transformer2DModel.from_pretrained(tmp_path / "merged").state_dict()
    expected = {k: v.double() for k, v in model.state_dict().items()}
    for path, delta in layout_deltas(factors, MAPPING).items():
        expected[f"{path.removeprefix('transformer.')}.weight"] += delta
    assert all(torch.allclose(merged[k].double(), v, atol=1e-5, rtol=0) for k, v in expected.items())


def test_fp8_weights_are_merged_only_into_a_wider_dtype(tmp_path, model, factors, musubi, capsys, monkeypatch):
    """fp8's step would round most of ΔW away: refused in one line, or written as --dtype says, from the exact
    fp8 values; a file whose fp8 weights carry scales is refused even then."""
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in to_bfl(model.state_dict()).items()}
    src = save_fp8 = tmp_path / "fp8.safetensors"
    save_file(fp8, str(save_fp8))
    err = refused(["merge", str(src), "--lora", str(musubi), "-o", str(tmp_path / "m.safetensors")], capsys, monkeypatch)
    assert "fp8" in err and "--dtype" in err and not (tmp_path / "m.safetensors").exists()
    cli(["merge", str(src), "--lora", str(musubi), "-o", str(tmp_path / "m.safetensors"), "--dtype", "bf16"],
        capsys, monkeypatch)
    got = load_file(tmp_path / "m.safetensors")
    deltas = {f"{p.removeprefix('transformer.')}.weight": d for p, d in layout_deltas(factors, MAPPING).items()}
    sd = {k: v.to(torch.float8_e4m3fn).double() for k, v in model.state_dict().items()}
    expected = to_bfl({k: v + deltas.get(k, 0) for k, v in sd.items()})
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(torch.allclose(got[k].double(), v, atol=1e-6, rtol=2 ** -7) for k, v in expected.items())
    save_file({**fp8, "double_blocks.0.img_attn.qkv.scale_weight": torch.ones(())}, str(tmp_path / "scaled.safetensors"))
    err = refused(["merge", str(tmp_path / "scaled.safetensors"), "--lora", str(musubi), "-o",
                   str(tmp_path / "s.safetensors"), "--dtype", "bf16"], capsys, monkeypatch)
    assert "scale" in err and not (tmp_path / "s.safetensors").exists()


def test_extract_resize_and_merge_loras_on_flux2_files(tmp_path, model, factors, musubi, capsys, monkeypatch):
    """extract between a BFL file and its merge gives the LoRA back in musubi's names; resize keeps the best
    rank-2 fit; merge-loras of the LoRA and its diffusers twin is twice the ΔW."""
    base = tmp_path / "base.safetensors"
    save_file(to_bfl(model.state_dict()), str(base))
    cli(["merge", str(base), "--lora", str(musubi), "-o", str(tmp_path / "tuned.safetensors")], capsys, monkeypatch)
    report = cli(["extract", str(base), str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                  "--rank", "8"], capsys, monkeypatch)
    assert report["model"] == "flux2"
    arch = architecture_from_models("flux2", {"transformer": model})
    expected = layout_deltas(factors, MAPPING)
    assert sorted(k.split(".")[0] for k in load_file(tmp_path / "x.safetensors") if k.endswith(".alpha")) == \
        sorted(flat(n) for n in MAPPING)
    assert_same_deltas(load_lora(tmp_path / "x.safetensors", architecture=arch), expected, rtol=1e-5)
    cli(["resize", str(musubi), "-o", str(tmp_path / "r.safetensors"), "--rank", "2"], capsys, monkeypatch)
    before, after = kohya_deltas(load_file(musubi)), kohya_deltas(load_file(tmp_path / "r.safetensors"))
    assert sorted(after) == sorted(before)
    for name, delta in before.items():  # each fused BFL Linear truncated as one matrix, as musubi names it
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = u[:, :2] * s[:2] @ vh[:2]
        assert float((after[name] - best).norm() / best.norm()) < 1e-5, name
    twin = write_layout_lora(tmp_path / "twin.safetensors", split_factors(factors, MAPPING),
                             lambda p: f"transformer.{p}", alpha=True)
    cli(["merge-loras", str(musubi), str(twin), "-o", str(tmp_path / "sum.safetensors"), "--checkpoint", str(base)],
        capsys, monkeypatch)
    assert_same_deltas(load_lora(tmp_path / "sum.safetensors", architecture=arch),
                       {p: 2 * d for p, d in expected.items()}, rtol=1e-5)


def test_a_real_size_klein_lora_converts_against_the_builtin_release(tmp_path, capsys, monkeypatch):
    """No --checkpoint: a musubi Klein 4B LoRA (rank 1, real shapes) is read against the built-in Klein 4B table and
    its diffusers output means what diffusers' own kohya converter makes of the source."""
    gen = torch.Generator().manual_seed(6)
    specs = real_lora_specs("klein-4b", rank=1)
    sd = {k: torch.tensor(0.5) if k.endswith(".alpha") else torch.randn(shape, generator=gen)
          for k, (_, shape) in specs.items()}
    save_file(sd, str(tmp_path / "klein.safetensors"))
    report = cli(["convert", str(tmp_path / "klein.safetensors"), "-o", str(tmp_path / "out.safetensors"),
                  "--to", "diffusers"], capsys, monkeypatch)
    assert report["base"] == "flux2"
    x = {w: torch.randn(w, generator=gen, dtype=torch.float64) for w in (3072, 9216, 12288)}
    ours, theirs = (Flux2Pipeline.lora_state_dict(str(p)) for p in (tmp_path / "out.safetensors",
                                                                     tmp_path / "klein.safetensors"))

    def applied(state_dict: dict) -> dict:  # B @ (A @ x): ΔW on a random vector, without forming [out, in]
        return {k: state_dict[k.replace("lora_A", "lora_B")].double() @ (v.double() @ x[v.shape[1]])
                for k, v in state_dict.items() if k.endswith("lora_A.weight")}

    got, expected = applied(ours), applied(theirs)
    assert sorted(got) == sorted(expected)
    assert all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6 * expected[k].abs().max()) for k in expected)


@pytest.mark.parametrize("variant", REAL)
def test_the_tables_written_out_are_diffusers_own(variant, model):
    """The real-size tables (plain Python, so reading a LoRA needs no diffusers) equal what diffusers builds."""
    from adapterzoo.formats.families.flux2.modules import CONFIGS, module_table
    from adapterzoo.formats.model.module_tables import build_on_meta, table_of

    assert module_table(CONFIGS[variant]).modules == table_of(build_on_meta("Flux2Transformer2DModel",
                                                                            CONFIGS[variant])).modules
    assert module_table(dict(model.config)).modules == table_of(model).modules


def test_a_pipeline_folder_says_its_release(tmp_path):
    from adapterzoo.formats.families.flux2.modules import CONFIGS

    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline",
                                                           "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel",
                                                                      **CONFIGS["klein-9b"]}))
    found = probe(tmp_path)
    assert (found.kind, found.base, found.details["variant"]) == ("checkpoint", "flux2", "klein-9b")
