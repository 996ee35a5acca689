"""Z-Image (issue 17): LoRAs of every dialect in and out, ComfyUI checkpoints both ways, merge, and Turbo/Base told
only by metadata (their tensors are the same). Oracles: diffusers' Z-Image converters and loader
(`ZImagePipeline.lora_state_dict` + `load_lora_into_transformer`) on a tiny `ZImageTransformer2DModel`, its
checkpoint converter, and ΔW in plain torch through ComfyUI's rows written out below (comfy's z_image_to_diffusers)."""

from __future__ import annotations

import factory
import pytest
import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
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
from zimage_tiny import to_comfy

from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.model.architectures import architecture_from_models
from adapterzoo.formats.probe import probe

D, FFN, IN, CAP = 64, 170, 4, 32  # 2 heads x 32, one layer and one refiner of each kind; patch 2: 16 inputs
L, N, C = "layers.0", "noise_refiner.0", "context_refiner.0"
# ComfyUI Linear -> the diffusers rows it holds; the rest of ComfyUI's names are diffusers' own
MAPPING = {
    f"{L}.attention.qkv": rows((f"{L}.attention.to_q", D), (f"{L}.attention.to_k", D), (f"{L}.attention.to_v", D)),
    f"{L}.attention.out": rows((f"{L}.attention.to_out.0", D)),
    f"{N}.attention.qkv": rows((f"{N}.attention.to_q", D), (f"{N}.attention.to_k", D), (f"{N}.attention.to_v", D)),
    f"{C}.attention.out": rows((f"{C}.attention.to_out.0", D)),
    f"{L}.feed_forward.w1": rows((f"{L}.feed_forward.w1", FFN)), f"{L}.feed_forward.w2": rows((f"{L}.feed_forward.w2", D)),
    f"{N}.feed_forward.w3": rows((f"{N}.feed_forward.w3", FFN)),
    f"{L}.adaLN_modulation.0": rows((f"{L}.adaLN_modulation.0", 4 * D)),
    "x_embedder": rows(("all_x_embedder.2-1", D)), "final_layer.linear": rows(("all_final_layer.2-1.linear", 4 * IN)),
    "final_layer.adaLN_modulation.1": rows(("all_final_layer.2-1.adaLN_modulation.1", D)),
    "t_embedder.mlp.0": rows(("t_embedder.mlp.0", 1024)), "cap_embedder.1": rows(("cap_embedder.1", D)),
}
IN_DIMS = {f"{L}.feed_forward.w2": FFN, "x_embedder": 4 * IN, "t_embedder.mlp.0": 256, "cap_embedder.1": CAP}
SHAPES = {name: (max(hi for _, _, hi in parts), IN_DIMS.get(name, D)) for name, parts in MAPPING.items()}
COMFY_FUSED = [f"{L}.attention.qkv", f"{N}.attention.qkv"]


def comfy(name: str) -> str:
    return "diffusion_model." + name


def flat(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


@pytest.fixture(scope="module")
def model() -> ZImageTransformer2DModel:
    torch.manual_seed(0)
    return ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=IN, dim=D, n_layers=1,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=CAP,
                                    axes_dims=[8, 12, 12], axes_lens=[64, 32, 32]).eval()


@pytest.fixture(scope="module")
def arch(model):
    return architecture_from_models("zimage", {"transformer": model})


@pytest.fixture(scope="module")
def factors():
    return random_factors(SHAPES, seed=3)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("zimage") / "transformer"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def musubi(tmp_path_factory, factors):
    """musubi-tuner's names: lora_unet_ + diffusers' module flattened, alpha per module."""
    return write_layout_lora(tmp_path_factory.mktemp("src") / "musubi.safetensors", split_factors(factors, MAPPING),
                             flat, "lora_down", "lora_up", alpha=True)


def load_into(state_dict: dict, transformer) -> None:
    ZImagePipeline.load_lora_into_transformer(state_dict, transformer=transformer)


# -- reading every dialect ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["comfy", "comfy-kohya", "ai-toolkit", "diffusers", "musubi"])
def test_every_dialect_reads_the_same_delta(tmp_path, arch, factors, musubi, dialect):
    split = split_factors(factors, MAPPING)
    path = tmp_path / f"{dialect}.safetensors"
    expected = layout_deltas(factors, MAPPING)
    if dialect == "comfy":  # ComfyUI's own names, fused qkv, no alpha
        write_layout_lora(path, factors, comfy)
        expected = layout_deltas(factors, MAPPING, scaled=False)
    elif dialect == "comfy-kohya":  # musubi's convert_z_image_lora_to_comfy: ComfyUI names flattened, alpha
        write_layout_lora(path, factors, flat, "lora_down", "lora_up", alpha=True)
    elif dialect == "ai-toolkit":  # diffusers names under diffusion_model., alpha
        write_layout_lora(path, split, comfy, alpha=True)
    elif dialect == "diffusers":
        write_layout_lora(path, split, lambda p: f"transformer.{p}", alpha=True)
    else:
        path = musubi
    found = probe(path)
    assert found.format == {"comfy": "comfy", "ai-toolkit": "comfy", "diffusers": "diffusers"}.get(dialect, "kohya")
    assert_same_deltas(load_lora(path, architecture=arch), expected)


def test_lokr_of_ai_toolkit_and_lycoris_read(tmp_path, arch):
    gen = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(4, 2, generator=gen), torch.randn(16, 32, generator=gen)
    save_file({f"diffusion_model.{L}.attention.to_q.lokr_w1": w1, f"diffusion_model.{L}.attention.to_q.lokr_w2": w2},
              str(tmp_path / "ai-toolkit.safetensors"))
    save_file({f"lycoris_{N.replace('.', '_')}_attention_to_k.lokr_w1": w1,
               f"lycoris_{N.replace('.', '_')}_attention_to_k.lokr_w2": w2}, str(tmp_path / "lycoris.safetensors"))
    delta = torch.kron(w1.double(), w2.double())
    assert_same_deltas(load_lora(tmp_path / "ai-toolkit.safetensors", architecture=arch),
                       {f"transformer.{L}.attention.to_q": delta})
    assert_same_deltas(load_lora(tmp_path / "lycoris.safetensors", architecture=arch),
                       {f"transformer.{N}.attention.to_k": delta})


# -- writing, read back by diffusers --------------------------------------------------------------------------


def test_diffusers_and_kohya_outputs_load_in_diffusers(tmp_path, model, folder, factors, musubi, capsys, monkeypatch):
    """musubi -> diffusers and -> kohya through the CLI: diffusers' loader patches every module with the reference
    ΔW, as its own converter reads the musubi source."""
    expected = layout_deltas(factors, MAPPING)
    assert_close_deltas(converted_deltas(ZImagePipeline.lora_state_dict(str(musubi))), expected)
    for to in ("diffusers", "kohya"):
        dest = tmp_path / f"{to}.safetensors"
        report = cli(["convert", str(musubi), "-o", str(dest), "--to", to, "--checkpoint", str(folder)],
                     capsys, monkeypatch)
        assert (report["base"], report["modules"]) == ("zimage", len(expected))
        assert_close_deltas(loaded_deltas(model, ZImagePipeline.lora_state_dict(str(dest)), load_into), expected)
    assert sorted(k for k in load_file(tmp_path / "kohya.safetensors") if k.endswith(".alpha")) == \
        sorted(k for k in load_file(musubi) if k.endswith(".alpha"))


def test_comfy_output_fuses_qkv_exactly(tmp_path, arch, folder, musubi, factors, capsys, monkeypatch):
    """musubi (split q, k, v) -> comfy: ComfyUI's names with q, k, v fused into attention.qkv, alpha folded; the
    same ΔW read back."""
    dest = tmp_path / "comfy.safetensors"
    cli(["convert", str(musubi), "-o", str(dest), "--to", "comfy", "--checkpoint", str(folder)], capsys, monkeypatch)
    written = load_file(dest)
    assert sorted({k.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight") for k in written}) == \
        sorted(comfy(n) for n in MAPPING)
    assert written[f"diffusion_model.{L}.attention.qkv.lora_B.weight"].shape[0] == 3 * D
    assert_same_deltas(load_lora(dest, architecture=arch), layout_deltas(factors, MAPPING))


# -- Turbo or Base, Z-Image or not: the real sizes (headers only) ---------------------------------------------


def real_checkpoint_specs(dim: int = 3840, layers: int = 30, adaln: str = "0") -> dict:
    """ComfyUI's Z-Image file (z_image_turbo_bf16.safetensors): fused qkv, its own names; Lumina 2's has `.1`."""
    head, ffn = 128, int(dim / 3 * 8)
    specs = {"x_embedder.weight": (dim, 64), "x_embedder.bias": (dim,), "cap_embedder.0.weight": (2560,),
             "cap_embedder.1.weight": (dim, 2560), "final_layer.linear.weight": (64, dim), "norm_final.weight": (dim,),
             "t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.2.weight": (256, 1024), "x_pad_token": (1, dim),
             "cap_pad_token": (1, dim), "final_layer.adaLN_modulation.1.weight": (dim, 256)}
    for blocks, count in (("layers", layers), ("noise_refiner", 2), ("context_refiner", 2)):
        for n in range(count):
            b = f"{blocks}.{n}"
            specs |= {f"{b}.attention.qkv.weight": (3 * dim, dim), f"{b}.attention.out.weight": (dim, dim),
                      f"{b}.attention.q_norm.weight": (head,), f"{b}.attention.k_norm.weight": (head,),
                      f"{b}.feed_forward.w1.weight": (ffn, dim), f"{b}.feed_forward.w2.weight": (dim, ffn),
                      f"{b}.feed_forward.w3.weight": (ffn, dim), f"{b}.attention_norm1.weight": (dim,)}
            if blocks != "context_refiner":
                specs[f"{b}.adaLN_modulation.{adaln}.weight"] = (4 * dim, 256)
    return {k: ("BF16", v) for k, v in specs.items()}


def test_turbo_and_base_are_told_only_by_metadata(tmp_path):
    plain = probe(factory.write_sparse_safetensors(tmp_path / "model.safetensors", real_checkpoint_specs()))
    assert (plain.kind, plain.base, plain.format) == ("checkpoint", "zimage", "ldm")
    assert "variant" not in plain.details and not plain.warnings
    named = probe(factory.write_sparse_safetensors(tmp_path / "z_image_turbo_bf16.safetensors", real_checkpoint_specs()))
    assert named.details["variant"] == "turbo" and "same tensor names and shapes" in named.warnings[0]
    lumina = probe(factory.write_sparse_safetensors(tmp_path / "lumina.safetensors",
                                                    real_checkpoint_specs(2304, 26, adaln="1")))
    assert lumina.base != "zimage"


def real_lora_specs(dim: int = 3840) -> dict:
    specs = {}
    for n in range(30):
        for module, (out, inp) in {"attention_to_q": (dim, dim), "attention_to_out_0": (dim, dim),
                                   "feed_forward_w1": (int(dim / 3 * 8), dim)}.items():
            specs |= {f"lora_unet_layers_{n}_{module}.lora_down.weight": ("BF16", (8, inp)),
                      f"lora_unet_layers_{n}_{module}.lora_up.weight": ("BF16", (out, 8)),
                      f"lora_unet_layers_{n}_{module}.alpha": ("F32", ())}
    return specs


def test_real_loras_by_shape_and_their_variant_by_metadata(tmp_path):
    found = probe(factory.write_sparse_safetensors(tmp_path / "l.safetensors", real_lora_specs()))
    assert (found.kind, found.base, found.format) == ("lora", "zimage", "kohya")
    assert found.details["coverage"]["layers"] == list(range(30)) and "variant" not in found.details
    told = probe(factory.write_sparse_safetensors(tmp_path / "t.safetensors", real_lora_specs(), {
        "ss_base_model_version": "z_image", "training_info": '{"name_or_path": "Tongyi-MAI/Z-Image-Turbo"}'}))
    assert told.details["variant"] == "turbo" and any("cannot confirm" in w for w in told.warnings)
    base = probe(factory.write_sparse_safetensors(tmp_path / "b.safetensors", real_lora_specs(),
                                                  {"modelspec.title": "my style (Z-Image Base)"}))
    assert base.details["variant"] == "base"


# -- checkpoints and merge ------------------------------------------------------------------------------------


def test_comfy_file_to_folder_and_back(tmp_path, model, capsys, monkeypatch):
    sd = model.state_dict()
    save_file({"model.diffusion_model." + k: v for k, v in to_comfy(sd).items()}, str(tmp_path / "z.safetensors"))
    report = cli(["convert", str(tmp_path / "z.safetensors"), "-o", str(tmp_path / "folder"), "--to", "diffusers"],
                 capsys, monkeypatch)
    assert (report["base"], report["dropped"]) == ("zimage", 1)  # norm_final, in neither model's forward
    loaded = ZImageTransformer2DModel.from_pretrained(tmp_path / "folder").state_dict()
    theirs = convert_z_image_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v
                                                                  for k, v in to_comfy(sd).items()})
    assert sorted(loaded) == sorted(sd) == sorted(theirs)
    assert all(torch.equal(loaded[k], sd[k]) and torch.equal(theirs[k], sd[k]) for k in sd)
    cli(["convert", str(tmp_path / "folder"), "-o", str(tmp_path / "back.safetensors"), "--to", "ldm"], capsys, monkeypatch)
    back, reference = load_file(tmp_path / "back.safetensors"), to_comfy(sd)
    del reference["norm_final.weight"]
    assert sorted(back) == sorted(reference) and all(torch.equal(back[k], reference[k]) for k in reference)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_a_comfy_file_and_a_folder_is_w_plus_delta(tmp_path, model, folder, factors, musubi, dtype,
                                                              capsys, monkeypatch):
    deltas = {f"{p.removeprefix('transformer.')}.weight": d for p, d in layout_deltas(factors, MAPPING).items()}
    expected = {k: v.to(dtype).double() + deltas.get(k, 0) for k, v in model.state_dict().items()}
    save_file({k: v.to(dtype) for k, v in to_comfy(model.state_dict()).items()}, str(tmp_path / "z.safetensors"))
    report = cli(["merge", str(tmp_path / "z.safetensors"), "--lora", str(musubi), "-o", str(tmp_path / "m.safetensors")],
                 capsys, monkeypatch)
    assert (report["base"], report["layout"]) == ("zimage", "single-file")
    got = load_file(tmp_path / "m.safetensors")
    reference = to_comfy(expected)
    tolerance = {"atol": 1e-5, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-7, "rtol": 2 ** -7}
    assert all(got[k].dtype == dtype for k in got)
    assert all(torch.allclose(got[k].double(), v.double(), **tolerance) for k, v in reference.items())
    if dtype == torch.float32:
        cli(["merge", str(folder), "--lora", str(musubi), "-o", str(tmp_path / "merged")], capsys, monkeypatch)
        merged = ZImageTransformer2DModel.from_pretrained(tmp_path / "merged").state_dict()
        assert all(torch.allclose(merged[k].double(), v, atol=1e-5, rtol=0) for k, v in expected.items())


def test_a_real_size_musubi_lora_converts_against_the_builtin_table(tmp_path, capsys, monkeypatch):
    """No --checkpoint: a musubi LoRA at Z-Image's real shapes (rank 1) -> comfy -> diffusers means what
    diffusers' own converter makes of the source."""
    gen = torch.Generator().manual_seed(7)
    sd = {k: torch.tensor(4.0) if k.endswith(".alpha") else torch.randn(shape[:1] + (1,) if "up" in k else (1,) + shape[1:],
                                                                         generator=gen)
          for k, (_, shape) in real_lora_specs().items()}
    save_file(sd, str(tmp_path / "musubi.safetensors"))
    cli(["convert", str(tmp_path / "musubi.safetensors"), "-o", str(tmp_path / "comfy.safetensors"), "--to", "comfy"],
        capsys, monkeypatch)
    report = cli(["convert", str(tmp_path / "comfy.safetensors"), "-o", str(tmp_path / "out.safetensors"),
                  "--to", "diffusers"], capsys, monkeypatch)
    assert (report["base"], report["from"]) == ("zimage", "comfy")
    x = {w: torch.randn(w, generator=gen, dtype=torch.float64) for w in (3840, 10240)}

    def applied(state_dict: dict) -> dict:
        return {k: state_dict[k.replace("lora_A", "lora_B")].double() @ (v.double() @ x[v.shape[1]])
                for k, v in state_dict.items() if k.endswith("lora_A.weight")}

    got = applied(ZImagePipeline.lora_state_dict(str(tmp_path / "out.safetensors")))
    expected = applied(ZImagePipeline.lora_state_dict(str(tmp_path / "musubi.safetensors")))
    assert all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-6 * expected[k].abs().max()) for k in expected)
    extra = set(got) - set(expected)  # k and v: fused into qkv beside q, their rows zero
    assert extra and all(".to_k." in k or ".to_v." in k for k in extra) and all(got[k].abs().max() == 0 for k in extra)


def test_the_table_written_out_is_diffusers_own(model):
    from adapterzoo.formats.families.zimage.modules import CONFIG, module_table
    from adapterzoo.formats.model.module_tables import build_on_meta, table_of

    omni = {**CONFIG, "siglip_feat_dim": 1152, "all_patch_size": [2, 1], "all_f_patch_size": [1, 1]}
    for config in (CONFIG, omni):
        assert module_table(config).modules == table_of(build_on_meta("ZImageTransformer2DModel", config)).modules
    assert module_table(dict(model.config)).modules == table_of(model).modules


def test_merge_into_a_pipeline_folder_rewrites_the_transformer(tmp_path, model, factors, musubi, capsys, monkeypatch):
    import json

    model.save_pretrained(tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({
        "_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "_name_or_path": "Tongyi-MAI/Z-Image-Turbo"}))
    assert probe(tmp_path / "pipe").base == "zimage"
    report = cli(["merge", str(tmp_path / "pipe"), "--lora", str(musubi), "-o", str(tmp_path / "out")], capsys, monkeypatch)
    assert (report["base"], report["layout"]) == ("zimage", "diffusers")
    assert (tmp_path / "out" / "model_index.json").is_file()
    merged = ZImageTransformer2DModel.from_pretrained(tmp_path / "out", subfolder="transformer").state_dict()
    deltas = {f"{p.removeprefix('transformer.')}.weight": d for p, d in layout_deltas(factors, MAPPING).items()}
    expected = {k: v.double() + deltas.get(k, 0) for k, v in model.state_dict().items()}
    assert all(torch.allclose(merged[k].double(), v, atol=1e-5, rtol=0) for k, v in expected.items())


# -- Turbo or Base between files: the same tensors, told apart by names alone -----------------------------------


def test_a_base_lora_into_a_turbo_checkpoint_is_refused_by_its_name(tmp_path, model, factors, musubi, capsys,
                                                                     monkeypatch):
    """The checkpoint says turbo by its file name, a LoRA base by its own: one line naming both and where each was
    read, nothing written; --allow-variant-mismatch merges W + ΔW with that line as a warning. A silent LoRA merges
    without a word; merge-loras refuses a Turbo LoRA (by metadata) beside a Base one."""
    ckpt = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file(to_comfy(model.state_dict()), str(ckpt))
    based = tmp_path / "style_zimage_base.safetensors"
    save_file(load_file(musubi), str(based))
    turbo = tmp_path / "t.safetensors"
    save_file(load_file(musubi), str(turbo), {"training_info": '{"name_or_path": "Tongyi-MAI/Z-Image-Turbo"}'})
    out = tmp_path / "m.safetensors"
    err = refused(["merge", str(ckpt), "--lora", str(based), "-o", str(out)], capsys, monkeypatch)
    assert err == (f"error: {ckpt.name} declares Z-Image variant turbo (read from its file name) but {based.name} "
                   "declares variant base (read from its file name); the two have the same tensor names and shapes, "
                   "so only these names tell them apart (--allow-variant-mismatch merges them anyway)")
    assert not out.exists()
    report = cli(["merge", str(ckpt), "--lora", str(based), "-o", str(out), "--allow-variant-mismatch"],
                 capsys, monkeypatch)
    assert report["warnings"] == [err.removeprefix("error: ").replace(
        " (--allow-variant-mismatch merges them anyway)", ": merged anyway (--allow-variant-mismatch)")]
    deltas = {f"{p.removeprefix('transformer.')}.weight": d for p, d in layout_deltas(factors, MAPPING).items()}
    expected = to_comfy({k: v.double() + deltas.get(k, 0) for k, v in model.state_dict().items()})
    got = load_file(out)
    assert all(torch.allclose(got[k].double(), v.double(), atol=1e-5, rtol=0) for k, v in expected.items())
    for lora in (musubi, turbo):
        assert cli(["merge", str(ckpt), "--lora", str(lora), "-o", str(tmp_path / f"ok-{lora.name}")],
                   capsys, monkeypatch)["warnings"] == []
    pair = ["merge-loras", str(musubi), str(turbo), str(based), "-o", str(tmp_path / "pair.safetensors")]
    err = refused(pair, capsys, monkeypatch)
    assert err.startswith(f"error: {turbo.name} declares Z-Image variant turbo (read from its metadata (training_info)) "
                          f"but {based.name} declares variant base (read from its file name)")
    assert not (tmp_path / "pair.safetensors").exists()
