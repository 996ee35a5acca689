"""Qwen-Image (issue 17): LoRAs of every dialect in and out, ComfyUI checkpoints both ways, merge, extract, resize,
and what tells Qwen-Image's files from Flux.1's (the same diffusers attention names at the same width). Oracles:
diffusers' Qwen-Image converter and loader (`QwenImagePipeline.lora_state_dict` + `load_lora_into_transformer`)
on a tiny `QwenImageTransformer2DModel`, its meta-device module table, and ΔW = alpha / r · up @ down in plain torch.
ComfyUI names every module as diffusers does, so each LoRA module here is a diffusers module under some prefix."""

from __future__ import annotations

import copy

import factory
import pytest
import torch
from deltas import kohya_deltas
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
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

D, IN, OUT, JOINT = 64, 16, 4, 24  # 2 heads x 32, two blocks; patch 2: proj_out 16 rows
B0, B1 = "transformer_blocks.0", "transformer_blocks.1"
SHAPES = {
    f"{B0}.attn.to_q": (D, D), f"{B0}.attn.to_k": (D, D), f"{B0}.attn.add_q_proj": (D, D),
    f"{B0}.attn.to_out.0": (D, D), f"{B1}.attn.to_add_out": (D, D), f"{B1}.attn.to_v": (D, D),
    f"{B0}.img_mlp.net.0.proj": (4 * D, D), f"{B0}.img_mlp.net.2": (D, 4 * D), f"{B1}.txt_mlp.net.0.proj": (4 * D, D),
    f"{B0}.img_mod.1": (6 * D, D), f"{B1}.txt_mod.1": (6 * D, D), "img_in": (D, IN), "txt_in": (D, JOINT),
    "time_text_embed.timestep_embedder.linear_1": (D, 256), "norm_out.linear": (2 * D, D), "proj_out": (4 * OUT, D),
}
MAPPING = {name: rows((name, shape[0])) for name, shape in SHAPES.items()}  # nothing fused or renamed


def flat(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


@pytest.fixture(scope="module")
def model() -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=IN, out_channels=OUT, num_layers=2,
                                       attention_head_dim=32, num_attention_heads=2, joint_attention_dim=JOINT,
                                       axes_dims_rope=[4, 14, 14]).eval()


@pytest.fixture(scope="module")
def arch(model):
    return architecture_from_models("qwen_image", {"transformer": model})


@pytest.fixture(scope="module")
def factors():
    return random_factors(SHAPES, seed=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("qwen") / "transformer"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def musubi(tmp_path_factory, factors):
    """musubi-tuner's names: lora_unet_ + diffusers' module flattened, alpha per module."""
    return write_layout_lora(tmp_path_factory.mktemp("src") / "musubi.safetensors", factors, flat, "lora_down",
                             "lora_up", alpha=True)


def load_into(state_dict: dict, transformer) -> None:
    QwenImagePipeline.load_lora_into_transformer(state_dict, transformer=transformer)


# -- reading every dialect ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["comfy", "ai-toolkit", "diffusers", "peft", "musubi"])
def test_every_dialect_reads_the_same_delta(tmp_path, arch, factors, musubi, dialect):
    path, expected = tmp_path / f"{dialect}.safetensors", layout_deltas(factors, MAPPING)
    if dialect == "comfy":  # ComfyUI's names (diffusers' under diffusion_model.), no alpha
        write_layout_lora(path, factors, lambda p: f"diffusion_model.{p}")
        expected = layout_deltas(factors, MAPPING, scaled=False)
    elif dialect == "ai-toolkit":  # the same names with alpha
        write_layout_lora(path, factors, lambda p: f"diffusion_model.{p}", alpha=True)
    elif dialect == "diffusers":
        write_layout_lora(path, factors, lambda p: f"transformer.{p}", alpha=True)
    elif dialect == "peft":
        write_layout_lora(path, factors, lambda p: f"base_model.model.{p}")
        expected = layout_deltas(factors, MAPPING, scaled=False)
    else:
        path = musubi
    found = probe(path)
    assert (found.kind, found.base) == ("lora", "qwen_image")
    assert found.format == {"ai-toolkit": "comfy", "musubi": "kohya"}.get(dialect, dialect)
    assert found.details["coverage"]["transformer_blocks"] == [0, 1] and found.details["coverage"]["mlp"]
    assert_same_deltas(load_lora(path, architecture=arch), expected)


def test_lokr_of_lycoris_reads(tmp_path, arch):
    gen = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(4, 2, generator=gen), torch.randn(16, 32, generator=gen)
    stem = f"lycoris_{B1}_img_mlp_net_2".replace(".", "_")
    save_file({f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2": w2.repeat(1, 4)[:, :128]}, str(tmp_path / "l.safetensors"))
    delta = torch.kron(w1.double(), w2.repeat(1, 4)[:, :128].double())
    assert_same_deltas(load_lora(tmp_path / "l.safetensors", architecture=arch), {f"transformer.{B1}.img_mlp.net.2": delta})


# -- writing, read back by diffusers --------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["diffusers", "kohya", "comfy"])
def test_every_output_loads_in_diffusers_with_the_same_delta(tmp_path, model, folder, factors, musubi, to,
                                                             capsys, monkeypatch):
    """musubi -> each dialect through the CLI: diffusers' loader patches every module with the ΔW its own converter
    reads from the musubi source."""
    expected = layout_deltas(factors, MAPPING)
    assert_close_deltas(converted_deltas(QwenImagePipeline.lora_state_dict(str(musubi))), expected)
    dest = tmp_path / f"{to}.safetensors"
    report = cli(["convert", str(musubi), "-o", str(dest), "--to", to, "--checkpoint", str(folder)], capsys, monkeypatch)
    assert (report["base"], report["modules"]) == ("qwen_image", len(expected))
    written = load_file(dest)
    prefix = {"diffusers": "transformer.", "kohya": "lora_unet_", "comfy": "diffusion_model."}[to]
    assert all(k.startswith(prefix) for k in written)
    assert_close_deltas(loaded_deltas(model, QwenImagePipeline.lora_state_dict(str(dest)), load_into), expected)
    if to == "kohya":
        assert sorted(k for k in written if k.endswith(".alpha")) == \
            sorted(k for k in load_file(musubi) if k.endswith(".alpha"))


def test_peft_output_loads_in_peft(tmp_path, model, folder, factors, musubi, capsys, monkeypatch):
    """musubi -> peft: a PEFT folder (adapter_model.safetensors, adapter_config.json) that peft itself loads with the
    same ΔW."""

    cli(["convert", str(musubi), "-o", str(tmp_path / "peft"), "--to", "peft", "--checkpoint", str(folder)],
        capsys, monkeypatch)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    got = {f"transformer.{name.removeprefix('base_model.model.')}": m.get_delta_weight("default").double()
           for name, m in loaded.named_modules() if hasattr(m, "get_delta_weight") and m.active_adapters}
    assert_close_deltas(got, layout_deltas(factors, MAPPING))


def test_a_real_size_musubi_lora_converts_against_the_builtin_table(tmp_path, capsys, monkeypatch):
    """No --checkpoint: a musubi LoRA at Qwen-Image's real shapes (rank 1, one block's modulation and attention: the
    ΔWs compared are 3072 wide) -> comfy -> kohya means what diffusers' own converter makes of the source."""
    gen = torch.Generator().manual_seed(7)
    save_file(rank_one_tensors(real_lora_specs(1, ("attn_to_q", "txt_mod_1")), gen, 4.0),
              str(tmp_path / "musubi.safetensors"))
    cli(["convert", str(tmp_path / "musubi.safetensors"), "-o", str(tmp_path / "comfy.safetensors"), "--to", "comfy"],
        capsys, monkeypatch)
    report = cli(["convert", str(tmp_path / "comfy.safetensors"), "-o", str(tmp_path / "out.safetensors"),
                  "--to", "kohya"], capsys, monkeypatch)
    assert (report["base"], report["from"]) == ("qwen_image", "comfy")
    x = {w: torch.randn(w, generator=gen, dtype=torch.float64) for w in (3072, 12288)}
    got = applied(QwenImagePipeline.lora_state_dict(str(tmp_path / "out.safetensors")), x)
    expected = applied(QwenImagePipeline.lora_state_dict(str(tmp_path / "musubi.safetensors")), x)
    assert sorted(got) == sorted(expected) and len(expected) == 2
    assert all(float((got[k] - v).norm() / v.norm()) < 1e-6 for k, v in expected.items())


# -- Qwen-Image or Flux.1, Edit or not: the real sizes (headers only) ------------------------------------------


def real_lora_specs(blocks: int = 60, modules: tuple[str, ...] = ("attn_to_q", "attn_add_k_proj", "img_mlp_net_2",
                                                                   "txt_mod_1")) -> dict:
    """musubi-tuner's Qwen-Image LoRA (names, shapes): the modules of every block at 3072 wide."""
    shapes = {"attn_to_q": (3072, 3072), "attn_add_k_proj": (3072, 3072), "img_mlp_net_2": (3072, 12288),
              "txt_mod_1": (18432, 3072)}
    specs = {}
    for n in range(blocks):
        for module in modules:
            out, inp = shapes[module]
            stem = f"lora_unet_transformer_blocks_{n}_{module}"
            specs |= {f"{stem}.lora_down.weight": ("BF16", (8, inp)), f"{stem}.lora_up.weight": ("BF16", (out, 8)),
                      f"{stem}.alpha": ("F32", ())}
    return specs


def diffusers_attention_specs(blocks: range) -> dict:
    """A diffusers-named LoRA of the joint attention only (what Flux.1's and Qwen-Image's trainers both write)."""
    specs = {}
    for n in blocks:
        for module in ("to_q", "add_q_proj"):
            stem = f"transformer.transformer_blocks.{n}.attn.{module}"
            specs |= {f"{stem}.lora_A.weight": ("BF16", (4, 3072)), f"{stem}.lora_B.weight": ("BF16", (3072, 4))}
    return specs


def test_real_loras_by_names_and_shapes(tmp_path):
    found = probe(factory.write_sparse_safetensors(tmp_path / "l.safetensors", real_lora_specs()))
    assert (found.kind, found.base, found.format) == ("lora", "qwen_image", "kohya")
    assert found.details["coverage"]["transformer_blocks"] == list(range(60)) and "variant" not in found.details
    edit = probe(factory.write_sparse_safetensors(tmp_path / "e.safetensors", real_lora_specs(), {
        "ss_base_model_version": "qwen_image_edit"}))
    assert edit.details["variant"] == "edit" and any("cannot confirm" in w for w in edit.warnings)
    attention = probe(factory.write_sparse_safetensors(tmp_path / "a.safetensors", diffusers_attention_specs(range(60))))
    assert (attention.base, attention.format) == ("qwen_image", "diffusers")  # past Flux.1's and HunyuanVideo's
    shallow = probe(factory.write_sparse_safetensors(tmp_path / "s.safetensors", diffusers_attention_specs(range(19)),
                                                     {"ss_base_model_version": "qwen_image"}))
    assert shallow.base == "qwen_image" and "flux" in shallow.details["also_fits"]
    assert probe(factory.write_sparse_safetensors(tmp_path / "f.safetensors",
                                                  diffusers_attention_specs(range(19)))).base == "flux"


def real_checkpoint_specs(prefix: str = "", layered: bool = False) -> dict:
    """Comfy-Org's qwen_image_bf16.safetensors (diffusion_models): diffusers' names, bare."""
    h = 3072
    specs = {"img_in.weight": (h, 64), "txt_in.weight": (h, 3584), "txt_norm.weight": (3584,),
             "time_text_embed.timestep_embedder.linear_1.weight": (h, 256), "proj_out.weight": (64, h),
             "norm_out.linear.weight": (2 * h, h)}
    if layered:
        specs["time_text_embed.addition_t_embedding.weight"] = (2, h)
    for n in range(60):
        b = f"transformer_blocks.{n}"
        specs |= {f"{b}.img_mod.1.weight": (6 * h, h), f"{b}.txt_mod.1.weight": (6 * h, h),
                  f"{b}.attn.to_q.weight": (h, h), f"{b}.attn.add_q_proj.weight": (h, h),
                  f"{b}.attn.norm_q.weight": (128,), f"{b}.img_mlp.net.0.proj.weight": (4 * h, h)}
    return {prefix + k: ("BF16", v) for k, v in specs.items()}


def test_real_checkpoints_and_their_variant(tmp_path):
    plain = probe(factory.write_sparse_safetensors(tmp_path / "model.safetensors", real_checkpoint_specs()))
    assert (plain.kind, plain.base, plain.format) == ("checkpoint", "qwen_image", "diffusers")
    assert (plain.details["width"], plain.details["transformer_blocks"]) == (3072, 60) and "variant" not in plain.details
    comfy = probe(factory.write_sparse_safetensors(tmp_path / "qwen_image_edit_2509_bf16.safetensors",
                                                   real_checkpoint_specs("model.diffusion_model.")))
    assert (comfy.base, comfy.format, comfy.details["variant"]) == ("qwen_image", "ldm", "edit")
    assert "same tensor names and shapes" in comfy.warnings[0]
    layered = probe(factory.write_sparse_safetensors(tmp_path / "x.safetensors", real_checkpoint_specs(layered=True)))
    assert layered.details["variant"] == "layered" and not layered.warnings


def test_the_table_written_out_is_diffusers_own(model):
    from adapterzoo.formats.families.qwen_image.modules import CONFIG, module_table
    from adapterzoo.formats.model.module_tables import build_on_meta, table_of

    layered = {**CONFIG, "num_layers": 2, "use_additional_t_cond": True, "use_layer3d_rope": True}
    for config in (CONFIG, layered):
        assert module_table(config).modules == table_of(build_on_meta("QwenImageTransformer2DModel", config)).modules
    assert module_table(dict(model.config)).modules == table_of(model).modules


# -- checkpoints, merge, extract, resize ----------------------------------------------------------------------


def test_comfy_file_to_folder_and_back(tmp_path, model, capsys, monkeypatch):
    sd = model.state_dict()
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(tmp_path / "q.safetensors"))
    report = cli(["convert", str(tmp_path / "q.safetensors"), "-o", str(tmp_path / "folder"), "--to", "diffusers"],
                 capsys, monkeypatch)
    assert (report["base"], report["dropped"]) == ("qwen_image", 0)
    assert_same_model(QwenImageTransformer2DModel.from_pretrained(tmp_path / "folder"), model)
    cli(["convert", str(tmp_path / "folder"), "-o", str(tmp_path / "back.safetensors"), "--to", "ldm"], capsys, monkeypatch)
    assert_same_tensors(load_file(tmp_path / "back.safetensors"), sd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_a_comfy_file_and_a_folder_is_w_plus_delta(tmp_path, model, folder, factors, musubi, dtype,
                                                              capsys, monkeypatch):
    deltas = {f"{p.removeprefix('transformer.')}.weight": d for p, d in layout_deltas(factors, MAPPING).items()}
    expected = {k: v.to(dtype).double() + deltas.get(k, 0) for k, v in model.state_dict().items()}
    save_file({k: v.to(dtype) for k, v in model.state_dict().items()}, str(tmp_path / "q.safetensors"))
    report = cli(["merge", str(tmp_path / "q.safetensors"), "--lora", str(musubi), "-o", str(tmp_path / "m.safetensors")],
                 capsys, monkeypatch)
    assert (report["base"], report["layout"]) == ("qwen_image", "single-file")
    got = load_file(tmp_path / "m.safetensors")
    tolerance = {"atol": 1e-5, "rtol": 0} if dtype == torch.float32 else {"atol": 1e-7, "rtol": 2 ** -7}
    assert sorted(got) == sorted(expected) and all(got[k].dtype == dtype for k in got)
    assert all(torch.allclose(got[k].double(), v, **tolerance) for k, v in expected.items())
    if dtype == torch.float32:
        report = cli(["merge", str(folder), "--lora", str(musubi), "-o", str(tmp_path / "merged")], capsys, monkeypatch)
        assert (report["base"], report["layout"]) == ("qwen_image", "diffusers")
        merged = QwenImageTransformer2DModel.from_pretrained(tmp_path / "merged").state_dict()
        assert all(torch.allclose(merged[k].double(), v, atol=1e-5, rtol=0) for k, v in expected.items())


def test_extract_and_resize(tmp_path, model, arch, factors, musubi, capsys, monkeypatch):
    """extract between a file and its merge gives the LoRA back in musubi's names; resize keeps the best rank-2 fit."""
    base = tmp_path / "base.safetensors"
    save_file(model.state_dict(), str(base))
    cli(["merge", str(base), "--lora", str(musubi), "-o", str(tmp_path / "tuned.safetensors")], capsys, monkeypatch)
    report = cli(["extract", str(base), str(tmp_path / "tuned.safetensors"), "-o", str(tmp_path / "x.safetensors"),
                  "--rank", "8"], capsys, monkeypatch)
    assert report["model"] == "qwen_image"
    assert sorted(k.split(".")[0] for k in load_file(tmp_path / "x.safetensors") if k.endswith(".alpha")) == \
        sorted(flat(n) for n in SHAPES)
    assert_same_deltas(load_lora(tmp_path / "x.safetensors", architecture=arch), layout_deltas(factors, MAPPING),
                       rtol=1e-5)
    cli(["resize", str(musubi), "-o", str(tmp_path / "r.safetensors"), "--rank", "2"], capsys, monkeypatch)
    assert_best_rank(kohya_deltas(load_file(musubi)), kohya_deltas(load_file(tmp_path / "r.safetensors")), 2)


def test_a_lora_of_another_size_is_refused_in_one_line(tmp_path, folder, capsys, monkeypatch):
    """A real-size Qwen-Image LoRA onto the tiny transformer: refused by shape, nothing written."""
    gen = torch.Generator().manual_seed(8)
    save_file(rank_one_tensors(real_lora_specs(2, ("attn_to_q",)), gen, 1.0), str(tmp_path / "big.safetensors"))
    err = refused(["merge", str(folder), "--lora", str(tmp_path / "big.safetensors"), "-o", str(tmp_path / "m")],
                  capsys, monkeypatch)
    assert "3072" in err and not (tmp_path / "m").exists()
