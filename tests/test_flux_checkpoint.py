"""Flux.1 checkpoints through the CLI (issue 11): BFL single file <-> diffusers transformer folder, merge into
both, and merge-loras / resize / extract on Flux files. Oracles: `FluxTransformer2DModel.from_pretrained` and
its forward, diffusers' own BFL converter (a pure function of the state dict, run at the real width 3072 on
one-column tensors, since only rows move), and ΔW in plain torch. The BFL file of a tiny model is written
here with the mapping of FLUX.md §1.2 spelled out below, never adapterzoo's table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import factory
import pytest
import torch
from cli_helpers import run
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from adapterzoo.formats.families.flux.checkpoint import bfl_tensors
from adapterzoo.formats.families.flux.modules import FLUX_DEV_CONFIG

HEADS, IN, JOINT, POOLED = 2, 8, 32, 16


def tiny(guidance: bool = True, head_dim: int = 128, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    axes = [16, 56, 56] if head_dim == 128 else [8, 28, 28]
    return FluxTransformer2DModel(patch_size=1, in_channels=IN, num_layers=1, num_single_layers=2,
                                  attention_head_dim=head_dim, num_attention_heads=HEADS, joint_attention_dim=JOINT,
                                  pooled_projection_dim=POOLED, guidance_embeds=guidance,
                                  axes_dims_rope=axes).eval()


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL names (FLUX.md §1.2), written out independently."""
    out: dict[str, torch.Tensor] = {}
    simple = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
              "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
              "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
              "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
              "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
              "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
              "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    for ours, bfl in simple.items():
        for leaf in ("weight", "bias"):
            if f"{ours}.{leaf}" in sd:
                out[f"{bfl}.{leaf}"] = sd[f"{ours}.{leaf}"]
    for leaf in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{leaf}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for n in blocks:
        b, d = f"transformer_blocks.{n}", f"double_blocks.{n}"
        for leaf in ("weight", "bias"):
            out[f"{d}.img_attn.qkv.{leaf}"] = torch.cat([sd[f"{b}.attn.to_{x}.{leaf}"] for x in "qkv"])
            out[f"{d}.txt_attn.qkv.{leaf}"] = torch.cat([sd[f"{b}.attn.add_{x}_proj.{leaf}"] for x in "qkv"])
            for bfl, ours in {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
                              "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                              "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
                              "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear"}.items():
                out[f"{d}.{bfl}.{leaf}"] = sd[f"{b}.{ours}.{leaf}"]
        for bfl, ours in {"img_attn.norm.query_norm": "norm_q", "img_attn.norm.key_norm": "norm_k",
                          "txt_attn.norm.query_norm": "norm_added_q", "txt_attn.norm.key_norm": "norm_added_k"}.items():
            out[f"{d}.{bfl}.scale"] = sd[f"{b}.attn.{ours}.weight"]
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for n in singles:
        b, s = f"single_transformer_blocks.{n}", f"single_blocks.{n}"
        for leaf in ("weight", "bias"):
            out[f"{s}.linear1.{leaf}"] = torch.cat([sd[f"{b}.attn.to_{x}.{leaf}"] for x in "qkv"]
                                                   + [sd[f"{b}.proj_mlp.{leaf}"]])
            out[f"{s}.linear2.{leaf}"] = sd[f"{b}.proj_out.{leaf}"]
            out[f"{s}.modulation.lin.{leaf}"] = sd[f"{b}.norm.linear.{leaf}"]
        out[f"{s}.norm.query_norm.scale"] = sd[f"{b}.attn.norm_q.weight"]
        out[f"{s}.norm.key_norm.scale"] = sd[f"{b}.attn.norm_k.weight"]
    return out


def inputs(head_dim: int = 128, guidance: bool = True) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {"hidden_states": torch.randn(1, 4, IN, generator=gen),
            "encoder_hidden_states": torch.randn(1, 3, JOINT, generator=gen),
            "pooled_projections": torch.randn(1, POOLED, generator=gen), "timestep": torch.tensor([0.5]),
            "img_ids": torch.rand(4, 3, generator=gen) * 8, "txt_ids": torch.zeros(3, 3),
            "guidance": torch.tensor([3.5]) if guidance else None}


@torch.no_grad()
def forward(model: FluxTransformer2DModel, guidance: bool = True) -> torch.Tensor:
    return model(**inputs(guidance=guidance), return_dict=False)[0].double()


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    return tiny()


@pytest.fixture
def bfl_file(tmp_path, model) -> Path:
    path = tmp_path / "flux-tiny.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in to_bfl(model.state_dict()).items()}, str(path))
    return path


def cli(args: list[str], capsys, monkeypatch) -> dict:
    code, out, err = run([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


# -- 1. checkpoints both ways ----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_file_to_folder_loads_in_diffusers_with_the_same_outputs(tmp_path, model, prefix, capsys, monkeypatch):
    src = tmp_path / "flux.safetensors"
    extra = {"first_stage_model.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)} if prefix else {}
    save_file({prefix + k: v for k, v in to_bfl(model.state_dict()).items()} | extra, str(src))
    report = cli(["convert", str(src), "-o", str(tmp_path / "out"), "--to", "diffusers"], capsys, monkeypatch)
    assert (report["base"], report["to"], report["dropped"]) == ("flux", "diffusers", len(extra))
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_single_layers == 2 and loaded.config.guidance_embeds
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(forward(loaded), forward(model), rtol=1e-5, atol=1e-6)


def test_bfl_to_folder_and_back_is_bit_identical(tmp_path, bfl_file, capsys, monkeypatch):
    cli(["convert", str(bfl_file), "-o", str(tmp_path / "folder"), "--to", "diffusers"], capsys, monkeypatch)
    report = cli(["convert", str(tmp_path / "folder"), "-o", str(tmp_path / "back.safetensors"), "--to", "ldm"],
                 capsys, monkeypatch)
    assert (report["base"], report["dtype"]) == ("flux", "bf16")
    original, back = load_file(bfl_file), load_file(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], v) and back[k].dtype == torch.bfloat16 for k, v in original.items())


def test_a_pipeline_folder_converts_to_the_bfl_file_diffusers_maps_back(tmp_path, model, capsys, monkeypatch):
    factory.save_flux_pipeline(model, tmp_path / "pipe")
    cli(["convert", str(tmp_path / "pipe"), "-o", str(tmp_path / "bfl.safetensors"), "--to", "ldm"], capsys, monkeypatch)
    written = load_file(tmp_path / "bfl.safetensors")
    expected = to_bfl(model.state_dict())
    assert sorted(written) == sorted(expected) and all(torch.equal(written[k], v) for k, v in expected.items())


def test_our_rows_are_diffusers_converters_rows_at_the_real_width():
    """diffusers' converter only moves rows and hard-codes width 3072: feed it [rows, 1] tensors numbered by
    row and compare with where our table says each diffusers row comes from."""
    config = {**FLUX_DEV_CONFIG, "num_layers": 2, "num_single_layers": 2}
    tensors = bfl_tensors(config)
    bfl: dict[str, torch.Tensor] = {}
    offset = 0
    for tensor in tensors:
        rows = max(hi for _, part in tensor.parts for _, hi in part)
        bfl[tensor.name] = torch.arange(offset, offset + rows, dtype=torch.float64)[:, None]
        offset += rows
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = {name: torch.cat([bfl[t.name][lo:hi] for lo, hi in part])
            for t in tensors for name, part in t.parts}
    assert sorted(converted) == sorted(ours)
    assert all(torch.equal(converted[k].reshape(-1, 1), v) for k, v in ours.items())


def test_probe_names_dev_and_schnell(tmp_path, model, capsys, monkeypatch):
    save_file(to_bfl(model.state_dict()), str(tmp_path / "dev.safetensors"))
    save_file(to_bfl(tiny(guidance=False).state_dict()), str(tmp_path / "schnell.safetensors"))
    for name, variant in (("dev", "dev"), ("schnell", "schnell")):
        found = cli(["probe", str(tmp_path / f"{name}.safetensors")], capsys, monkeypatch)
        assert (found["kind"], found["base"], found["details"]["variant"]) == ("checkpoint", "flux", variant)
    model.save_pretrained(tmp_path / "folder")
    found = cli(["probe", str(tmp_path / "folder")], capsys, monkeypatch)
    assert (found["base"], found["format"], found["details"]["variant"]) == ("flux", "diffusers", "dev")
    for in_channels, variant in ((384, "fill"), (128, "depth")):  # FLUX.1-Fill / -Depth img_in widths
        header = {"img_in.weight": ("BF16", (3072, in_channels)), "guidance_in.in_layer.weight": ("BF16", (3072, 256)),
                  "double_blocks.0.img_attn.norm.key_norm.scale": ("BF16", (128,))}
        path = factory.write_sparse_safetensors(tmp_path / f"{variant}.safetensors", header)
        assert cli(["probe", str(path)], capsys, monkeypatch)["details"]["variant"] == variant


def test_another_head_dim_converts_with_rope_axes_that_fit(tmp_path, capsys, monkeypatch):
    small = tiny(guidance=False, head_dim=64)
    save_file(to_bfl(small.state_dict()), str(tmp_path / "s.safetensors"))
    report = cli(["convert", str(tmp_path / "s.safetensors"), "-o", str(tmp_path / "out"), "--to", "diffusers"],
                 capsys, monkeypatch)
    assert any("rope axes" in w for w in report["warnings"])
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.axes_dims_rope == [8, 28, 28] and not loaded.config.guidance_embeds
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(forward(loaded, guidance=False), forward(small, guidance=False), rtol=1e-5, atol=1e-6)


def test_a_broken_bfl_file_is_one_line(tmp_path, model, capsys, monkeypatch):
    sd = to_bfl(model.state_dict())
    del sd["single_blocks.1.linear2.weight"]
    save_file(sd, str(tmp_path / "broken.safetensors"))
    code, _, err = run(["convert", str(tmp_path / "broken.safetensors"), "-o", str(tmp_path / "out"),
                        "--to", "diffusers"], capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "missing" in err
    assert not (tmp_path / "out").exists()


# -- 2. merge into a BFL file and a diffusers folder -----------------------------------------------------

H, M = HEADS * 128, 4 * HEADS * 128
# kohya LoRA modules on BFL names -> (diffusers module, BFL rows) of each part, FLUX.md §1.2-1.3
KOHYA = {
    "double_blocks.0.img_attn.qkv": [("transformer_blocks.0.attn.to_q", 0, H), ("transformer_blocks.0.attn.to_k", H, 2 * H),
                                     ("transformer_blocks.0.attn.to_v", 2 * H, 3 * H)],
    "single_blocks.1.linear1": [("single_transformer_blocks.1.attn.to_q", 0, H),
                                ("single_transformer_blocks.1.attn.to_k", H, 2 * H),
                                ("single_transformer_blocks.1.attn.to_v", 2 * H, 3 * H),
                                ("single_transformer_blocks.1.proj_mlp", 3 * H, 3 * H + M)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", H, 2 * H), ("norm_out.linear", 0, H)],
    "double_blocks.0.txt_mod.lin": [("transformer_blocks.0.norm1_context.linear", 0, 6 * H)],
}
DIFFUSERS = {"transformer_blocks.0.attn.to_q": (H, H), "transformer_blocks.0.attn.to_v": (H, H),
             "single_transformer_blocks.0.proj_mlp": (M, H), "norm_out.linear": (2 * H, H),
             "single_transformer_blocks.1.proj_out": (H, H + M)}


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A kohya LoRA on fused BFL modules and a diffusers one on split modules, and the ΔW (diffusers space,
    float64) of each at weights 0.7 and 1 together."""
    folder = tmp_path_factory.mktemp("loras")
    gen = torch.Generator().manual_seed(3)
    kohya, deltas = {}, {}
    for i, (name, parts) in enumerate(KOHYA.items()):
        rows = max(hi for _, _, hi in parts)
        stem, rank, alpha = "lora_unet_" + name.replace(".", "_"), 4 + i, 2.0 + i
        down, up = torch.randn(rank, H, generator=gen) * 0.1, torch.randn(rows, rank, generator=gen) * 0.1
        kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
        delta = 0.7 * alpha / rank * up.double() @ down.double()
        for target, lo, hi in parts:
            deltas[target] = torch.cat([deltas[target], delta[lo:hi]]) if target in deltas else delta[lo:hi]
    ours = {}
    for target, (rows, cols) in DIFFUSERS.items():
        down, up = torch.randn(3, cols, generator=gen) * 0.1, torch.randn(rows, 3, generator=gen) * 0.1
        ours |= {f"transformer.{target}.lora_A.weight": down, f"transformer.{target}.lora_B.weight": up}
        deltas[target] = deltas.get(target, 0) + up.double() @ down.double()
    save_file(kohya, str(folder / "kohya.safetensors"))
    save_file(ours, str(folder / "diffusers.safetensors"))
    return folder / "kohya.safetensors", folder / "diffusers.safetensors", deltas


def merged_reference(model, deltas: dict[str, torch.Tensor], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The diffusers state dict (its values rounded to `dtype`) with every ΔW added, in float64."""
    sd = {k: v.to(dtype).double() for k, v in model.state_dict().items()}
    for target, delta in deltas.items():
        sd[f"{target}.weight"] = sd[f"{target}.weight"] + delta
    return sd


def test_merge_into_a_bfl_file_lands_on_fused_rows_exactly(tmp_path, model, loras, capsys, monkeypatch):
    kohya, ours, deltas = loras
    src = tmp_path / "flux.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in to_bfl(model.state_dict()).items()}, str(src))
    report = cli(["merge", str(src), "--lora", f"{kohya}:0.7", "--lora", str(ours), "-o",
                  str(tmp_path / "merged.safetensors")], capsys, monkeypatch)
    assert (report["base"], report["layout"]) == ("flux", "single-file")
    got = load_file(tmp_path / "merged.safetensors")
    expected = to_bfl(merged_reference(model, deltas))
    assert sorted(got) == sorted("model.diffusion_model." + k for k in expected)
    for key, value in expected.items():
        assert torch.allclose(got["model.diffusion_model." + key].double(), value, atol=1e-5, rtol=0), key
    changed = {k for k, v in to_bfl(model.state_dict()).items() if not torch.equal(got["model.diffusion_model." + k], v)}
    assert changed == {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight",
                       "final_layer.adaLN_modulation.1.weight", "double_blocks.0.txt_mod.lin.weight",
                       "single_blocks.0.linear1.weight", "single_blocks.1.linear2.weight"}


def test_merge_keeps_bf16(tmp_path, bfl_file, model, loras, capsys, monkeypatch):
    kohya, ours, deltas = loras
    cli(["merge", str(bfl_file), "--lora", f"{kohya}:0.7", "--lora", str(ours), "-o", str(tmp_path / "m.safetensors")],
        capsys, monkeypatch)
    got = load_file(tmp_path / "m.safetensors")
    expected = to_bfl(merged_reference(model, deltas, torch.bfloat16))
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    for key, value in expected.items():  # one bf16 rounding of W + ΔW (ΔW itself is ~10x larger than that)
        assert torch.allclose(got[key].double(), value, atol=1e-7, rtol=2 ** -7), key


def test_merge_into_a_folder_equals_diffusers_fused_lora(tmp_path, model, loras, capsys, monkeypatch):
    from diffusers import FluxPipeline

    kohya, ours, deltas = loras
    model.save_pretrained(tmp_path / "transformer")
    report = cli(["merge", str(tmp_path / "transformer"), "--lora", f"{kohya}:0.7", "--lora", str(ours), "-o",
                  str(tmp_path / "merged")], capsys, monkeypatch)
    assert (report["base"], report["layout"]) == ("flux", "diffusers")
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "merged").eval()
    reference = merged_reference(model, deltas)
    assert all(torch.allclose(v.double(), reference[k], atol=1e-5, rtol=0) for k, v in merged.state_dict().items())
    # diffusers' own loader, fused, on the diffusers-format part alone
    cli(["merge", str(tmp_path / "transformer"), "--lora", str(ours), "-o", str(tmp_path / "ours")],
        capsys, monkeypatch)
    fused = copy.deepcopy(model)
    state_dict, alphas = FluxPipeline.lora_state_dict(str(ours), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=fused)
    fused.fuse_lora()
    fused.unload_lora()
    ours_merged = FluxTransformer2DModel.from_pretrained(tmp_path / "ours").eval()
    assert all(torch.allclose(v, fused.state_dict()[k], atol=1e-5, rtol=0) for k, v in ours_merged.state_dict().items())
    assert not torch.equal(forward(ours_merged), forward(model))


def test_merge_refuses_a_sd_lora_on_flux(tmp_path, bfl_file, capsys, monkeypatch):
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2, 1, 1)}, str(sd1))
    code, _, err = run(["merge", str(bfl_file), "--lora", str(sd1), "-o", str(tmp_path / "m.safetensors")],
                       capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1 and not (tmp_path / "m.safetensors").exists()


# -- 3. merge-loras, resize, extract on Flux files -------------------------------------------------------


def kohya_bfl_deltas(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """BFL weight key -> ΔW (float64) of a kohya Flux file, from its own tensors: alpha / r · up @ down."""
    sd = load_file(path)
    by_flat = {"lora_unet_" + n.removesuffix(".weight").replace(".", "_"): n for n in names}
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            up = sd[f"{stem}.lora_up.weight"].double()
            out[by_flat[stem]] = float(sd[f"{stem}.alpha"]) / down.shape[0] * up @ down.double()
    return out


def expected_bfl_deltas(model, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA deltas in BFL space (fused rows, swapped halves), through the mapping written above."""
    before, after = to_bfl(merged_reference(model, {})), to_bfl(merged_reference(model, deltas))
    return {k: after[k] - before[k] for k in before if not torch.equal(after[k], before[k])}


def assert_deltas(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float) -> None:
    assert sorted(got) == sorted(expected)
    for key, delta in expected.items():
        assert float((got[key] - delta).norm() / delta.norm()) < tolerance, key


def test_merge_loras_of_two_flux_dialects_writes_kohya_bfl_names_with_the_sum(tmp_path, model, loras, capsys,
                                                                              monkeypatch):
    kohya, ours, deltas = loras
    base = tmp_path / "base.safetensors"
    save_file(to_bfl(model.state_dict()), str(base))
    cli(["merge-loras", f"{kohya}:0.7", str(ours), "-o", str(tmp_path / "sum.safetensors"), "--checkpoint", str(base)],
        capsys, monkeypatch)
    expected = expected_bfl_deltas(model, deltas)
    assert_deltas(kohya_bfl_deltas(tmp_path / "sum.safetensors", list(to_bfl(model.state_dict()))), expected, 1e-6)


def test_resize_of_a_flux_kohya_file_is_the_best_low_rank_fit(tmp_path, model, loras, capsys, monkeypatch):
    kohya, _, _ = loras
    cli(["resize", str(kohya), "-o", str(tmp_path / "r2.safetensors"), "--rank", "2"], capsys, monkeypatch)
    names = list(to_bfl(model.state_dict()))
    before, after = kohya_bfl_deltas(kohya, names), kohya_bfl_deltas(tmp_path / "r2.safetensors", names)
    best = {}
    for key, delta in before.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best[key] = u[:, :2] * s[:2] @ vh[:2]
    assert_deltas(after, best, 1e-5)  # fp32 arithmetic


def test_extract_between_two_bfl_files_gives_back_the_merged_lora(tmp_path, model, loras, capsys, monkeypatch):
    kohya, _, _ = loras
    base = tmp_path / "base.safetensors"
    save_file(to_bfl(model.state_dict()), str(base))
    cli(["merge", str(base), "--lora", str(kohya), "-o", str(tmp_path / "tuned.safetensors")], capsys, monkeypatch)
    report = cli(["extract", str(base), str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                  "--rank", "8"], capsys, monkeypatch)
    assert report["model"] == "flux"
    names = list(to_bfl(model.state_dict()))
    tuned, original = load_file(tmp_path / "tuned.safetensors"), to_bfl(model.state_dict())
    expected = {k: tuned[k].double() - original[k].double() for k in names if not torch.equal(tuned[k], original[k])}
    assert_deltas(kohya_bfl_deltas(tmp_path / "x.safetensors", names), expected, 1e-5)


def test_merge_into_a_flux_pipeline_folder_rewrites_the_transformer(tmp_path, model, loras, capsys, monkeypatch):
    kohya, ours, deltas = loras
    pipe = factory.save_flux_pipeline(model, tmp_path / "pipe")
    cli(["merge", str(pipe), "--lora", f"{kohya}:0.7", "--lora", str(ours), "-o", str(tmp_path / "merged")],
        capsys, monkeypatch)
    merged = FluxTransformer2DModel.from_pretrained(tmp_path / "merged", subfolder="transformer")
    reference = merged_reference(model, deltas)
    assert (tmp_path / "merged" / "model_index.json").is_file()
    assert all(torch.allclose(v.double(), reference[k], atol=1e-5, rtol=0) for k, v in merged.state_dict().items())


def test_merge_into_a_flux_pipeline_patches_clip_too(tmp_path, model, loras, capsys, monkeypatch):
    from transformers import CLIPTextModel

    kohya, _, _ = loras
    pipe = factory.save_flux_pipeline(model, tmp_path / "pipe", with_clip=True)
    clip = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    width = CLIPTextModel.from_pretrained(pipe / "text_encoder").config.hidden_size
    gen = torch.Generator().manual_seed(4)
    down, up = torch.randn(2, width, generator=gen), torch.randn(width, 2, generator=gen)
    save_file(load_file(kohya) | {f"{clip}.lora_down.weight": down, f"{clip}.lora_up.weight": up,
                                  f"{clip}.alpha": torch.tensor(1.0)}, str(tmp_path / "both.safetensors"))
    report = cli(["merge", str(pipe), "--lora", str(tmp_path / "both.safetensors"), "-o", str(tmp_path / "out")],
                 capsys, monkeypatch)
    assert report["loras"][0]["components"]["text_encoder"] == 1
    before = CLIPTextModel.from_pretrained(pipe / "text_encoder").state_dict()
    after = CLIPTextModel.from_pretrained(tmp_path / "out" / "text_encoder").state_dict()
    key = next(k for k in before if k.endswith("encoder.layers.0.self_attn.q_proj.weight"))
    expected = before[key].double() + up.double() @ down.double() / 2
    assert torch.allclose(after[key].double(), expected, atol=1e-5, rtol=0)


def test_a_kohya_lora_training_clip_l_converts_and_merges_against_a_transformer_alone(
        tmp_path, model, bfl_file, loras, capsys, monkeypatch):
    """Issue 15 §1 defect: CLIP-L's names and shapes come from the built-in table when the checkpoint (a BFL
    file, a bare transformer folder) has none; convert keeps the CLIP part exactly, merge names it in one line
    and, with --allow-unmatched, merges the transformer part alone."""
    kohya, _, _ = loras
    clip = "lora_te1_text_model_encoder_layers_11_mlp_fc2"
    gen = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, 3072, generator=gen), torch.randn(768, 2, generator=gen)
    both = tmp_path / "both.safetensors"
    save_file(load_file(kohya) | {f"{clip}.lora_down.weight": down, f"{clip}.lora_up.weight": up,
                                  f"{clip}.alpha": torch.tensor(1.0)}, str(both))
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    for checkpoint in (bfl_file, folder):
        dest = tmp_path / f"{checkpoint.stem}-lora.safetensors"
        cli(["convert", str(both), "-o", str(dest), "--to", "diffusers", "--checkpoint", str(checkpoint)],
            capsys, monkeypatch)
        written = load_file(dest)
        a = written["text_encoder.encoder.layers.11.mlp.fc2.lora_A.weight"]
        b = written["text_encoder.encoder.layers.11.mlp.fc2.lora_B.weight"]
        assert torch.allclose(b.double() @ a.double(), up.double() @ down.double() / 2, atol=1e-6, rtol=0)
    code, _, err = run(["merge", str(bfl_file), "--lora", str(both), "-o", str(tmp_path / "m.safetensors")],
                       capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "text-encoder part (1 module(s)" in err and "a transformer alone" in err
    report = cli(["merge", str(bfl_file), "--lora", str(both), "-o", str(tmp_path / "m.safetensors"),
                  "--allow-unmatched"], capsys, monkeypatch)
    assert any("text-encoder part" in w for w in report["warnings"])
    cli(["merge", str(bfl_file), "--lora", str(kohya), "-o", str(tmp_path / "k.safetensors")], capsys, monkeypatch)
    merged, transformer_part = load_file(tmp_path / "m.safetensors"), load_file(tmp_path / "k.safetensors")
    assert merged.keys() == transformer_part.keys()
    assert all(torch.equal(v, transformer_part[k]) for k, v in merged.items())
