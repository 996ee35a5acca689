"""Chroma (issue 17): never taken for Flux.1 nor Flux.1 for it; LoRAs of every dialect in and out, checkpoints both
ways, merge. Oracles: diffusers' Chroma loader (`ChromaPipeline`, Flux's LoRA mixin) on a tiny
`ChromaTransformer2DModel`, and ΔW in plain torch through the BFL rows written out below (diffusers'
`convert_chroma_transformer_checkpoint_to_diffusers`, which itself only takes the real width)."""

from __future__ import annotations

import factory
import pytest
import torch
from diffusers import ChromaPipeline, ChromaTransformer2DModel
from layout_checks import (
    assert_close_deltas,
    assert_same_deltas,
    cli,
    layout_deltas,
    loaded_deltas,
    random_factors,
    refused,
    rows,
    split_factors,
    write_layout_lora,
)
from safetensors.torch import load_file, save_file

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.checkpoint_targets import check_lora_base, checkpoint_targets
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.model.architectures import architecture_from_models
from adapterzoo.formats.probe import probe

H, M, IN, JOINT, AH, AC = 32, 128, 8, 24, 32, 16  # 2 heads x 16; approximator 32 wide on 16 channels, 2 layers
B, S, G = "transformer_blocks.0", "single_transformer_blocks.0", "distilled_guidance_layer"
MAPPING = {
    "img_in": rows(("x_embedder", H)), "txt_in": rows(("context_embedder", H)),
    f"{G}.in_proj": rows((f"{G}.in_proj", AH)), f"{G}.out_proj": rows((f"{G}.out_proj", H)),
    f"{G}.layers.0.in_layer": rows((f"{G}.layers.0.linear_1", AH)),
    f"{G}.layers.1.out_layer": rows((f"{G}.layers.1.linear_2", AH)),
    "double_blocks.0.img_attn.qkv": rows((f"{B}.attn.to_q", H), (f"{B}.attn.to_k", H), (f"{B}.attn.to_v", H)),
    "double_blocks.0.txt_attn.qkv": rows((f"{B}.attn.add_q_proj", H), (f"{B}.attn.add_k_proj", H),
                                         (f"{B}.attn.add_v_proj", H)),
    "double_blocks.0.img_attn.proj": rows((f"{B}.attn.to_out.0", H)),
    "double_blocks.0.txt_attn.proj": rows((f"{B}.attn.to_add_out", H)),
    "double_blocks.0.img_mlp.0": rows((f"{B}.ff.net.0.proj", M)), "double_blocks.0.img_mlp.2": rows((f"{B}.ff.net.2", H)),
    "double_blocks.0.txt_mlp.0": rows((f"{B}.ff_context.net.0.proj", M)),
    "single_blocks.0.linear1": rows((f"{S}.attn.to_q", H), (f"{S}.attn.to_k", H), (f"{S}.attn.to_v", H),
                                    (f"{S}.proj_mlp", M)),
    "single_blocks.0.linear2": rows((f"{S}.proj_out", H)),
    "final_layer.linear": rows(("proj_out", IN)),
}
IN_DIMS = {"img_in": IN, "txt_in": JOINT, f"{G}.in_proj": AC, f"{G}.out_proj": AH, f"{G}.layers.0.in_layer": AH,
           f"{G}.layers.1.out_layer": AH, "double_blocks.0.img_mlp.2": M, "single_blocks.0.linear2": H + M}
SHAPES = {name: (max(hi for _, _, hi in parts), IN_DIMS.get(name, H)) for name, parts in MAPPING.items()}


def flat(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


@pytest.fixture(scope="module")
def model() -> ChromaTransformer2DModel:
    torch.manual_seed(0)
    return ChromaTransformer2DModel(patch_size=1, in_channels=IN, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=AC,
                                    approximator_hidden_dim=AH, approximator_layers=2).eval()


@pytest.fixture(scope="module")
def arch(model):
    return architecture_from_models("chroma", {"transformer": model})


@pytest.fixture(scope="module")
def factors():
    return random_factors(SHAPES, seed=2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("chroma") / "transformer"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def kohya(tmp_path_factory, factors):
    return write_layout_lora(tmp_path_factory.mktemp("src") / "kohya.safetensors", factors, flat, "lora_down",
                             "lora_up", alpha=True)


def load_into(state_dict: dict, transformer) -> None:
    ChromaPipeline.load_lora_into_transformer(state_dict, network_alphas=None, transformer=transformer)


# -- LoRAs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["ai-toolkit", "kohya", "diffusers"])
def test_every_dialect_reads_the_bfl_rows_exactly(tmp_path, arch, factors, kohya, dialect):
    if dialect == "ai-toolkit":
        path = write_layout_lora(tmp_path / "a.safetensors", factors, lambda n: "diffusion_model." + n)
        expected = layout_deltas(factors, MAPPING, scaled=False)
    elif dialect == "kohya":
        path, expected = kohya, layout_deltas(factors, MAPPING)
    else:
        path = write_layout_lora(tmp_path / "d.safetensors", split_factors(factors, MAPPING),
                                 lambda p: f"transformer.{p}", alpha=True)
        expected = layout_deltas(factors, MAPPING)
    assert_same_deltas(load_lora(path, architecture=arch), expected)


def test_diffusers_output_loads_in_chromas_loader(tmp_path, model, folder, factors, kohya, capsys, monkeypatch):
    dest = tmp_path / "out.safetensors"
    report = cli(["convert", str(kohya), "-o", str(dest), "--to", "diffusers", "--checkpoint", str(folder)],
                 capsys, monkeypatch)
    assert (report["base"], report["from"]) == ("chroma", "kohya")
    state_dict = ChromaPipeline.lora_state_dict(str(dest))
    assert_close_deltas(loaded_deltas(model, state_dict, load_into), layout_deltas(factors, MAPPING))


@pytest.mark.parametrize("to", ["kohya", "bfl"])
def test_kohya_and_bfl_outputs_fuse_back_exactly(tmp_path, arch, folder, factors, to, capsys, monkeypatch):
    split = write_layout_lora(tmp_path / "split.safetensors", split_factors(factors, MAPPING),
                              lambda p: f"transformer.{p}", alpha=True)
    dest = tmp_path / f"{to}.safetensors"
    cli(["convert", str(split), "-o", str(dest), "--to", to, "--checkpoint", str(folder)], capsys, monkeypatch)
    spell = flat if to == "kohya" else (lambda n: "diffusion_model." + n)
    assert sorted({k.rsplit(".", 2 if to == "bfl" else 1)[0].split(".lora")[0] for k in load_file(dest)}) == \
        sorted(spell(n) for n in MAPPING)
    assert_same_deltas(load_lora(dest, architecture=arch), layout_deltas(factors, MAPPING))


# -- never Flux.1, and Flux.1 never Chroma -------------------------------------------------------------------


def real_specs(chroma: bool, prefix: str = "") -> dict:
    """A real-size checkpoint header: Flux.1-schnell's blocks, with Chroma's approximator instead of the
    modulations when `chroma` (diffusers' CHECKPOINT_KEY_NAMES markers, ComfyUI's model_detection)."""
    h, specs = 3072, {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "final_layer.linear.weight": (64, 3072)}
    for n in range(19):
        for stream in ("img", "txt"):
            d = f"double_blocks.{n}.{stream}"
            specs |= {f"{d}_attn.qkv.weight": (3 * h, h), f"{d}_attn.proj.weight": (h, h), f"{d}_mlp.0.weight": (4 * h, h),
                      f"{d}_mlp.2.weight": (h, 4 * h), f"{d}_attn.norm.query_norm.scale": (128,),
                      f"{d}_attn.norm.key_norm.scale": (128,)}
            if not chroma:
                specs[f"{d}_mod.lin.weight"] = (6 * h, h)
    for n in range(38):
        specs |= {f"single_blocks.{n}.linear1.weight": (7 * h, h), f"single_blocks.{n}.linear2.weight": (h, 5 * h),
                  f"single_blocks.{n}.norm.query_norm.scale": (128,), f"single_blocks.{n}.norm.key_norm.scale": (128,)}
        if not chroma:
            specs[f"single_blocks.{n}.modulation.lin.weight"] = (3 * h, h)
    if chroma:
        specs |= {f"{G}.in_proj.weight": (5120, 64), f"{G}.in_proj.bias": (5120,), f"{G}.out_proj.weight": (h, 5120)}
        for n in range(5):
            specs |= {f"{G}.layers.{n}.in_layer.weight": (5120, 5120), f"{G}.layers.{n}.out_layer.weight": (5120, 5120),
                      f"{G}.norms.{n}.scale": (5120,)}
    else:
        specs |= {"time_in.in_layer.weight": (h, 256), "vector_in.in_layer.weight": (h, 768),
                  "final_layer.adaLN_modulation.1.weight": (2 * h, h)}
    return {prefix + k: ("BF16", v) for k, v in specs.items()}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_checkpoints_are_never_mistaken(tmp_path, prefix):
    chroma = probe(factory.write_sparse_safetensors(tmp_path / "c.safetensors", real_specs(True, prefix)))
    flux = probe(factory.write_sparse_safetensors(tmp_path / "f.safetensors", real_specs(False, prefix)))
    assert (chroma.kind, chroma.base, chroma.format) == ("checkpoint", "chroma", "ldm")
    assert (flux.base, flux.details["variant"]) == ("flux", "schnell")


def real_lora(path, names: list[str], metadata: dict | None = None):
    h = 3072
    shapes = {"img_attn.qkv": (3 * h, h), "img_attn.proj": (h, h), "linear1": (7 * h, h), "in_proj": (5120, 64),
              "img_mod.lin": (6 * h, h)}
    specs = {}
    for name in names:
        out, inp = next(shape for suffix, shape in shapes.items() if name.endswith(suffix))
        specs |= {f"diffusion_model.{name}.lora_A.weight": ("BF16", (4, inp)),
                  f"diffusion_model.{name}.lora_B.weight": ("BF16", (out, 4))}
    return factory.write_sparse_safetensors(path, specs, metadata)


def test_loras_chroma_or_flux1_or_both_and_metadata_decides(tmp_path):
    """The approximator makes a LoRA Chroma's, a modulation Flux.1's; the blocks alone fit both: Flux.1 claims it
    and says Chroma fits as well, kohya's ss_base_model_version `chroma` makes it Chroma's."""
    blocks = ["double_blocks.0.img_attn.qkv", "double_blocks.18.img_attn.proj", "single_blocks.37.linear1"]
    own = probe(real_lora(tmp_path / "own.safetensors", [*blocks, f"{G}.in_proj"]))
    flux = probe(real_lora(tmp_path / "flux.safetensors", [*blocks, "double_blocks.0.img_mod.lin"]))
    both = probe(real_lora(tmp_path / "both.safetensors", blocks))
    told = probe(real_lora(tmp_path / "told.safetensors", blocks, {"ss_base_model_version": "chroma"}))
    assert (own.base, flux.base, "also_fits" in flux.details) == ("chroma", "flux", False)
    assert (both.base, both.details["also_fits"], told.base, told.details["also_fits"]) == (
        "flux", ["chroma"], "chroma", ["flux"])
    assert own.details["coverage"]["double_blocks"] == [0, 18] and own.details["coverage"]["single_blocks"] == [37]
    checkpoint = checkpoint_targets(factory.write_sparse_safetensors(tmp_path / "c.safetensors", real_specs(True)))
    check_lora_base(checkpoint, tmp_path / "both.safetensors")  # fits: merge takes it
    with pytest.raises(AdapterzooError, match="flux lora but c.safetensors is a chroma checkpoint"):
        check_lora_base(checkpoint, tmp_path / "flux.safetensors")


# -- checkpoints and merge ------------------------------------------------------------------------------------


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ChromaTransformer2DModel state dict -> BFL names (diffusers' converter, read backwards)."""
    out = {}
    renames = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
               f"{G}.in_proj": f"{G}.in_proj", f"{G}.out_proj": f"{G}.out_proj",
               f"{B}.attn.to_out.0": "double_blocks.0.img_attn.proj", f"{B}.attn.to_add_out": "double_blocks.0.txt_attn.proj",
               f"{B}.ff.net.0.proj": "double_blocks.0.img_mlp.0", f"{B}.ff.net.2": "double_blocks.0.img_mlp.2",
               f"{B}.ff_context.net.0.proj": "double_blocks.0.txt_mlp.0", f"{B}.ff_context.net.2": "double_blocks.0.txt_mlp.2",
               f"{S}.proj_out": "single_blocks.0.linear2"}
    for n in range(2):
        renames |= {f"{G}.layers.{n}.linear_1": f"{G}.layers.{n}.in_layer", f"{G}.layers.{n}.linear_2": f"{G}.layers.{n}.out_layer"}
        out[f"{G}.norms.{n}.scale"] = sd[f"{G}.norms.{n}.weight"]
    for leaf in ("weight", "bias"):
        out |= {f"{bfl}.{leaf}": sd[f"{ours}.{leaf}"] for ours, bfl in renames.items()}
        out[f"double_blocks.0.img_attn.qkv.{leaf}"] = torch.cat([sd[f"{B}.attn.to_{x}.{leaf}"] for x in "qkv"])
        out[f"double_blocks.0.txt_attn.qkv.{leaf}"] = torch.cat([sd[f"{B}.attn.add_{x}_proj.{leaf}"] for x in "qkv"])
        out[f"single_blocks.0.linear1.{leaf}"] = torch.cat([sd[f"{S}.attn.to_{x}.{leaf}"] for x in "qkv"]
                                                           + [sd[f"{S}.proj_mlp.{leaf}"]])
    for bfl, ours in {"img_attn.norm.query_norm": "norm_q", "img_attn.norm.key_norm": "norm_k",
                      "txt_attn.norm.query_norm": "norm_added_q", "txt_attn.norm.key_norm": "norm_added_k"}.items():
        out[f"double_blocks.0.{bfl}.scale"] = sd[f"{B}.attn.{ours}.weight"]
    out["single_blocks.0.norm.query_norm.scale"] = sd[f"{S}.attn.norm_q.weight"]
    out["single_blocks.0.norm.key_norm.scale"] = sd[f"{S}.attn.norm_k.weight"]
    return out


def test_bfl_file_to_folder_and_back(tmp_path, model, capsys, monkeypatch):
    sd = model.state_dict()
    save_file(to_bfl(sd), str(tmp_path / "chroma.safetensors"))
    assert probe(tmp_path / "chroma.safetensors").base == "chroma"
    cli(["convert", str(tmp_path / "chroma.safetensors"), "-o", str(tmp_path / "folder"), "--to", "diffusers"],
        capsys, monkeypatch)
    loaded = ChromaTransformer2DModel.from_pretrained(tmp_path / "folder").state_dict()
    assert sorted(loaded) == sorted(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    cli(["convert", str(tmp_path / "folder"), "-o", str(tmp_path / "back.safetensors"), "--to", "ldm"], capsys, monkeypatch)
    back, reference = load_file(tmp_path / "back.safetensors"), to_bfl(sd)
    assert sorted(back) == sorted(reference) and all(torch.equal(back[k], reference[k]) for k in reference)


def test_merge_into_a_bfl_file_and_a_folder_is_w_plus_delta(tmp_path, model, folder, factors, kohya, capsys,
                                                            monkeypatch):
    deltas = {f"{p.removeprefix('transformer.')}.weight": d for p, d in layout_deltas(factors, MAPPING).items()}
    expected = {k: v.double() + deltas.get(k, 0) for k, v in model.state_dict().items()}
    save_file(to_bfl(model.state_dict()), str(tmp_path / "chroma.safetensors"))
    report = cli(["merge", str(tmp_path / "chroma.safetensors"), "--lora", str(kohya), "-o",
                  str(tmp_path / "m.safetensors")], capsys, monkeypatch)
    assert report["base"] == "chroma"
    got, reference = load_file(tmp_path / "m.safetensors"), to_bfl(expected)
    assert all(torch.allclose(got[k].double(), v, atol=1e-5, rtol=0) for k, v in reference.items())
    cli(["merge", str(folder), "--lora", str(kohya), "-o", str(tmp_path / "merged")], capsys, monkeypatch)
    merged = ChromaTransformer2DModel.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.allclose(merged[k].double(), v, atol=1e-5, rtol=0) for k, v in expected.items())
    flux_lora = tmp_path / "flux.safetensors"
    save_file({"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(2, H),
               "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": torch.zeros(6 * H, 2)}, str(flux_lora))
    err = refused(["merge", str(folder), "--lora", str(flux_lora), "-o", str(tmp_path / "x")], capsys, monkeypatch)
    assert "flux lora" in err and "chroma checkpoint" in err and not (tmp_path / "x").exists()


def test_the_table_written_out_is_diffusers_own(model):
    from adapterzoo.formats.families.chroma.modules import CONFIG, module_table
    from adapterzoo.formats.model.module_tables import build_on_meta, table_of

    assert module_table(CONFIG).modules == table_of(build_on_meta("ChromaTransformer2DModel", CONFIG)).modules
    assert module_table(dict(model.config)).modules == table_of(model).modules
