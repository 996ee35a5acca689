"""SD3 Medium and SD3.5 (Large, Medium): probe, LoRA dialects, convert, merge, merge-loras, resize, extract.

The references are independent of adapterzoo: diffusers' own single-file converter
(`convert_sd3_transformer_checkpoint_to_diffusers`) says what an SAI-layout tensor is in diffusers' layout, and
diffusers' SD3 LoRA loader (`SD3LoraLoaderMixin`) says what a written diffusers file does to a tiny
SD3Transformer2DModel. A LoRA in SAI names (kohya, ComfyUI) is applied in plain torch to the SAI weights and
carried to diffusers' layout by that converter: that is the ΔW every reading and writing must reproduce.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import factory
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders import SD3LoraLoaderMixin
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file
from sd3_tiny import sai_shapes

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.lora_convert import convert_lora
from adapterzoo.formats.probe import probe
from adapterzoo.ops.extract import extract_lora
from adapterzoo.ops.lowrank import Rank
from adapterzoo.ops.merge_checkpoint import LoraSpec, merge_checkpoint
from adapterzoo.ops.merge_loras import merge_loras
from adapterzoo.ops.resize import resize_lora

LDM = "model.diffusion_model."
TINY = {"sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
        "pooled_projection_dim": 24, "pos_embed_max_size": 8, "qk_norm": "rms_norm", "dual_attention_layers": [0]}
# (width, depth, q/k norms, dual-attention blocks, pos_embed side) of the published releases' transformers
RELEASES = {"sd3-medium": (1536, 24, False, [], 192), "sd35-large": (2432, 38, True, [], 192),
            "sd35-medium": (1536, 24, True, list(range(13)), 384)}


def no_hash(path: Path) -> str:
    return "0" * 64


# -- SAI single-file layouts, written from the MMDiT reference code's names ---------------------------------------


def tiny_sai_shapes() -> dict[str, tuple[int, ...]]:
    return sai_shapes(16, TINY["num_layers"], True, TINY["dual_attention_layers"], 8, head=8, joint=32, pooled=24,
                      channels=4)


def to_diffusers(sai: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own single-file conversion (it pops what it reads, so it gets a copy)."""
    return convert_sd3_transformer_checkpoint_to_diffusers(dict(sai))


@pytest.mark.parametrize("release", RELEASES)
def test_the_layouts_written_here_are_the_releases_as_diffusers_reads_them(release):
    """The real-size SAI names and shapes above are what diffusers' converter turns into exactly the tensors of
    SD3Transformer2DModel with the published config (both on the meta device: no weights)."""
    from adapterzoo.formats.families.sd3.modules import CONFIGS

    width, depth, qk, dual, pos = RELEASES[release]
    meta = {k: torch.empty(s, device="meta") for k, s in sai_shapes(width, depth, qk, dual, pos).items()}
    converted = {k: tuple(v.shape) for k, v in to_diffusers(meta).items()}
    config = CONFIGS[{"sd3-medium": "sd3", "sd35-large": "large", "sd35-medium": "medium"}[release]]
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    assert converted == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("release,base,variant", [("sd3-medium", "sd3", None), ("sd35-large", "sd35", "large"),
                                                  ("sd35-medium", "sd35", "medium")])
@pytest.mark.parametrize("prefix", ["", LDM])
def test_probe_names_each_release_from_a_real_size_header(tmp_path, release, base, variant, prefix):
    specs = {prefix + k: ("BF16", s) for k, s in sai_shapes(*RELEASES[release]).items()}
    found = probe(factory.write_sparse_safetensors(tmp_path / f"{release}.safetensors", specs))
    assert (found.kind, found.base, found.format, found.dtype) == ("checkpoint", base, "ldm", "bf16")
    assert found.details.get("variant") == variant and found.details["components"] == ["transformer"]
    assert found.details["depth"] == RELEASES[release][1] and not found.warnings


def test_large_turbo_is_told_by_metadata_and_a_lying_label_is_a_warning(tmp_path):
    specs = {k: ("BF16", s) for k, s in sai_shapes(*RELEASES["sd35-large"]).items()}
    turbo = factory.write_sparse_safetensors(tmp_path / "turbo.safetensors", specs, {
        "modelspec.architecture": "stable-diffusion-3-5-large", "modelspec.title": "SD3.5 Large Turbo"})
    assert probe(turbo).details["variant"] == "large-turbo"
    lying = factory.write_sparse_safetensors(tmp_path / "lying.safetensors", specs, {
        "modelspec.architecture": "stable-diffusion-3-5-medium"})
    found = probe(lying)
    assert (found.base, found.details["variant"]) == ("sd35", "large")
    assert any("metadata says sd35 medium" in w and "sd35 large" in w for w in found.warnings)


def test_probe_reads_diffusers_transformer_and_pipeline_folders(tmp_path, tiny):
    model, _ = tiny
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    found = probe(tmp_path / "pipe" / "transformer")
    assert (found.kind, found.base, found.format, found.details["variant"]) == ("checkpoint", "sd35", "diffusers",
                                                                              "medium")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    found = probe(tmp_path / "pipe")
    assert (found.kind, found.base, found.format) == ("checkpoint", "sd35", "diffusers")


# -- a tiny model, its SAI file and LoRAs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple[SD3Transformer2DModel, dict[str, torch.Tensor]]:
    """A tiny SD3.5-Medium-shaped model (q/k norms, attn2 in block 0) and its SAI single-file tensors; the model
    is what diffusers' converter makes of those tensors."""
    gen = torch.Generator().manual_seed(0)
    sai = {k: torch.randn(s, generator=gen) * 0.1 for k, s in tiny_sai_shapes().items()}
    model = SD3Transformer2DModel(**TINY).eval()
    model.load_state_dict(to_diffusers(sai), strict=True)
    return model, sai


def sai_lora(seed: int = 1, rank: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(down, up, alpha) on every SAI Linear of the tiny model, the swapped final modulations included."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (key, shape) in enumerate(sorted(tiny_sai_shapes().items())):
        if key.endswith(".weight") and len(shape) == 2:
            r = rank + i % 2
            out[key.removesuffix(".weight")] = (torch.randn(r, shape[1], generator=gen) * 0.3,
                                                torch.randn(shape[0], r, generator=gen) * 0.3, float(1 + i % 3))
    return out


def kohya_sd(factors: dict, alpha: bool = True) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (down, up, a) in factors.items():
        stem = "lora_unet_" + name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
        if alpha:
            sd[f"{stem}.alpha"] = torch.tensor(a)
    return sd


def comfy_sd(factors: dict) -> dict[str, torch.Tensor]:
    """ComfyUI's own names, no alpha (read as alpha = rank): the scale folded into up."""
    sd = {}
    for name, (down, up, a) in factors.items():
        sd[f"diffusion_model.{name}.lora_A.weight"] = down
        sd[f"diffusion_model.{name}.lora_B.weight"] = up * (a / down.shape[0])
    return sd


def reference_deltas(factors: dict) -> dict[str, torch.Tensor]:
    """ΔW per diffusers weight: the SAI-layout ΔW (plain torch) through diffusers' converter from zero weights."""
    zero = {k: torch.zeros(s, dtype=torch.float64) for k, s in tiny_sai_shapes().items()}
    for name, (down, up, a) in factors.items():
        zero[f"{name}.weight"] += up.double() @ down.double() * (a / down.shape[0])
    return {k: v for k, v in to_diffusers(zero).items() if k.endswith(".weight") and v.abs().max() > 0}


def diffusers_deltas(model: SD3Transformer2DModel, path: Path) -> dict[str, torch.Tensor]:
    """What diffusers' SD3 loader makes of a file: each patched Linear's ΔW, on a copy of the model."""
    loaded = copy.deepcopy(model)
    state_dict = SD3LoraLoaderMixin.lora_state_dict(str(path))
    SD3LoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=loaded)
    return {f"{name}.weight": module.get_delta_weight("default_0").detach().double()
            for name, module in loaded.named_modules() if hasattr(module, "lora_A") and "default_0" in module.lora_A}


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = 1e-6) -> None:
    assert sorted(got) == sorted(expected)
    for key, delta in expected.items():
        error = float((got[key].double() - delta).norm() / delta.norm())
        assert error <= rel, f"{key}: relative error {error:.2e}"


def sai_deltas(sd: dict[str, torch.Tensor], down: str, up: str, prefix: str) -> dict:
    """A file in SAI names applied in plain torch, as (down, up, alpha) for `reference_deltas`."""
    out = {}
    for key, d in sd.items():
        if key.endswith(f".{down}.weight"):
            stem = key.removesuffix(f".{down}.weight")
            u = sd[f"{stem}.{up}.weight"]
            alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else d.shape[0]
            name = stem.removeprefix(prefix)
            if prefix == "lora_unet_":
                name = next(n for n in tiny_sai_names() if n.replace(".", "_") == name)
            out[name] = (d, u, alpha)
    return out


def tiny_sai_names() -> list[str]:
    return [k.removesuffix(".weight") for k in tiny_sai_shapes() if k.endswith(".weight")]


@pytest.fixture()
def sai_file(tmp_path, tiny) -> Path:
    """The tiny model as a ComfyUI single file (`model.diffusion_model.` names), fp32."""
    _, sai = tiny
    path = tmp_path / "sd35-tiny.safetensors"
    save_file({LDM + k: v.contiguous() for k, v in sai.items()}, str(path))
    return path


# -- probe of every dialect --------------------------------------------------------------------------------------


def test_probe_names_dialect_base_and_coverage_of_each_spelling(tmp_path, tiny):
    factors = sai_lora()
    save_file(kohya_sd(factors), str(tmp_path / "kohya.safetensors"))
    save_file(comfy_sd(factors), str(tmp_path / "comfy.safetensors"))
    lokr = {f"lora_unet_{n.replace('.', '_')}.{p}": torch.ones(s) for n in ("joint_blocks.0.x_block.attn.qkv",)
            for p, s in (("lokr_w1", (4, 2)), ("lokr_w2", (12, 8)))}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    for name, fmt, kind in (("kohya", "kohya", "lora"), ("comfy", "comfy", "lora"), ("lokr", "lycoris", "lycoris")):
        found = probe(tmp_path / f"{name}.safetensors")
        assert (found.kind, found.format, found.base) == (kind, fmt, "sd35"), name
    coverage = probe(tmp_path / "kohya.safetensors").details["coverage"]
    assert coverage == {"joint_blocks": [0, 1, 2], "dual_attention": True, "text_encoders": [],
                        "other_modules": 7}


@pytest.mark.parametrize("width,metadata,base,variant,also", [
    (2432, {}, "sd35", "large", None),
    (1536, {}, "sd35", "medium", ["sd3"]),
    (1536, {"modelspec.architecture": "stable-diffusion-3-medium/lora"}, "sd3", None, ["sd35"]),
    (1536, {"ss_base_model_version": "sd3.5_medium"}, "sd35", "medium", ["sd3"]),
])
def test_lora_base_and_variant_from_width_then_metadata(tmp_path, width, metadata, base, variant, also):
    """diffusers names (PEFT prefix `transformer.`) at real width; without attn2 a 1536-wide LoRA fits SD3 and
    SD3.5 Medium alike, so metadata decides and the other stays in `also_fits`."""
    specs = {}
    for i in range(2):
        for proj in ("to_q", "to_k", "add_q_proj"):
            specs[f"transformer.transformer_blocks.{i}.attn.{proj}.lora_A.weight"] = ("F16", (4, width))
            specs[f"transformer.transformer_blocks.{i}.attn.{proj}.lora_B.weight"] = ("F16", (width, 4))
    found = probe(factory.write_sparse_safetensors(tmp_path / "l.safetensors", specs, metadata))
    assert (found.format, found.base, found.details.get("variant"), found.details.get("also_fits")) == (
        "diffusers", base, variant, also)


def test_a_flux_sized_mmdit_lora_is_not_taken_for_sd3(tmp_path):
    specs = {"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": ("F16", (4, 3072)),
             "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": ("F16", (3072, 4))}
    assert probe(factory.write_sparse_safetensors(tmp_path / "f.safetensors", specs)).base != "sd35"


# -- convert: exact against diffusers' loader ----------------------------------------------------------------------


@pytest.mark.parametrize("source", ["kohya", "comfy"])
def test_sai_dialects_convert_to_diffusers_with_the_loaders_delta(tmp_path, tiny, sai_file, source):
    model, _ = tiny
    factors = sai_lora()
    src = tmp_path / f"{source}.safetensors"
    save_file(kohya_sd(factors) if source == "kohya" else comfy_sd(factors), str(src))
    dest = tmp_path / "out.safetensors"
    report = convert_lora(src, dest, "diffusers", architecture=_targets(sai_file).architecture)
    assert report["base"] == "sd35"
    assert_same(diffusers_deltas(model, dest), reference_deltas(factors))


def _targets(path: Path):
    from adapterzoo.formats.checkpoint_targets import checkpoint_targets

    return checkpoint_targets(path)


@pytest.fixture()
def diffusers_source(tmp_path, tiny) -> tuple[Path, dict[str, torch.Tensor]]:
    """A diffusers-format LoRA (what diffusers' SD3 trainer saves) and the ΔW diffusers' loader reads from it."""
    model, _ = tiny
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks."):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=gen) * 0.3
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=gen) * 0.3
    path = tmp_path / "diffusers.safetensors"
    save_file(sd, str(path))
    return path, diffusers_deltas(model, path)


@pytest.mark.parametrize("to", ["kohya", "comfy"])
def test_diffusers_lora_writes_sai_names_that_apply_as_the_loader_reads(tmp_path, sai_file, diffusers_source, to):
    """The written kohya/comfy file, applied in plain torch to the SAI weights and converted by diffusers, is the
    ΔW diffusers' loader reads from the source: q, k, v fused into qkv row blocks exactly."""
    src, expected = diffusers_source
    dest = tmp_path / f"{to}.safetensors"
    convert_lora(src, dest, to, architecture=_targets(sai_file).architecture)
    sd = load_file(dest)
    read = (sai_deltas(sd, "lora_down", "lora_up", "lora_unet_") if to == "kohya"
            else sai_deltas(sd, "lora_A", "lora_B", "diffusion_model."))
    assert any(name.endswith("attn.qkv") for name in read)
    assert_same(reference_deltas(read), expected)


def test_peft_output_loads_in_peft_with_the_same_delta(tmp_path, tiny, sai_file):
    from peft import PeftModel

    model, _ = tiny
    factors = sai_lora()
    save_file(kohya_sd(factors), str(tmp_path / "k.safetensors"))
    convert_lora(tmp_path / "k.safetensors", tmp_path / "peft", "peft", architecture=_targets(sai_file).architecture)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft")
    got = {f"{name.removeprefix('base_model.model.')}.weight": m.get_delta_weight("default").detach().double()
           for name, m in loaded.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert_same(got, reference_deltas(factors))


def test_builtin_tables_read_a_real_size_lora_without_a_checkpoint(tmp_path):
    """No --checkpoint: the file's width picks SD3.5 Large's or Medium's shipped table."""
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for width, tag in ((2432, "large"), (1536, "medium")):
        sd = {"lora_unet_joint_blocks_37_context_block_adaLN_modulation_1.lora_down.weight":
              torch.randn(2, width, generator=gen)} if tag == "large" else {}
        sd |= {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(2, width, generator=gen),
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(3 * width, 2, generator=gen)}
        if tag == "large":
            sd["lora_unet_joint_blocks_37_context_block_adaLN_modulation_1.lora_up.weight"] = torch.randn(
                2 * width, 2, generator=gen)
        save_file(sd, str(tmp_path / f"{tag}.safetensors"))
        report = convert_lora(tmp_path / f"{tag}.safetensors", tmp_path / f"{tag}-d.safetensors", "diffusers")
        out = load_file(tmp_path / f"{tag}-d.safetensors")
        assert report["base"] == "sd35" and "transformer.transformer_blocks.0.attn.to_v.lora_B.weight" in out
        header = json.loads(Path(tmp_path / f"{tag}-d.safetensors").read_bytes()[8:8 + int.from_bytes(
            Path(tmp_path / f"{tag}-d.safetensors").read_bytes()[:8], "little")])["__metadata__"]
        assert header["modelspec.architecture"] == f"stable-diffusion-3-5-{tag}/lora"


def test_refusals_are_one_line_and_name_the_reason(tmp_path, sai_file):
    architecture = _targets(sai_file).architecture
    sd = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 2432),
          "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(3 * 2432, 2)}
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 768)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(768, 2)
    save_file(sd, str(tmp_path / "te.safetensors"))
    with pytest.raises(AdapterzooError, match="text_encoder"):
        convert_lora(tmp_path / "te.safetensors", tmp_path / "x.safetensors", "comfy")
    lokr = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w1": torch.ones(4, 2),
            "lora_unet_joint_blocks_0_x_block_attn_qkv.lokr_w2": torch.ones(12, 8)}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    with pytest.raises(AdapterzooError, match="cannot be written as comfy exactly"):
        convert_lora(tmp_path / "lokr.safetensors", tmp_path / "y.safetensors", "comfy", architecture=architecture)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


# -- merge, merge-loras, resize, extract ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_into_an_sai_single_file_is_w_plus_delta(tmp_path, tiny, dtype):
    _, sai = tiny
    path = tmp_path / "ckpt.safetensors"
    save_file({LDM + k: v.to(dtype).contiguous() for k, v in sai.items()}, str(path))
    factors = sai_lora()
    save_file(kohya_sd(factors), str(tmp_path / "k.safetensors"))
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(path, [LoraSpec(tmp_path / "k.safetensors", 0.5)], out, sha256=no_hash)
    merged = load_file(out)
    assert {v.dtype for v in merged.values()} == {dtype}
    got = to_diffusers({k.removeprefix(LDM): v.double() for k, v in merged.items()})
    base = to_diffusers({k: v.to(dtype).double() for k, v in sai.items()})
    deltas = reference_deltas({n: (d, u, a * 0.5) for n, (d, u, a) in factors.items()})
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for key, weight in base.items():
        expected = weight + deltas.get(key, 0)
        assert float((got[key] - expected).norm() / expected.norm()) <= tolerance, key


def test_merge_into_a_diffusers_folder_is_w_plus_delta(tmp_path, tiny, diffusers_source):
    model, _ = tiny
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    src, expected = diffusers_source
    out = tmp_path / "merged"
    merge_checkpoint(folder, [LoraSpec(src)], out, sha256=no_hash)
    merged = SD3Transformer2DModel.from_pretrained(out).state_dict()
    for key, weight in model.state_dict().items():
        want = weight.double() + expected.get(key, 0)
        assert float((merged[key].double() - want).norm() / want.norm()) <= 1e-5, key


def test_a_lora_for_large_is_refused_by_a_medium_checkpoint(tmp_path, sai_file):
    sd = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(2, 2432),
          "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.zeros(3 * 2432, 2)}
    save_file(sd, str(tmp_path / "large.safetensors"))
    with pytest.raises(AdapterzooError, match="shapes"):
        merge_checkpoint(sai_file, [LoraSpec(tmp_path / "large.safetensors")], tmp_path / "o.safetensors",
                         sha256=no_hash)


def test_merge_loras_resize_and_extract_keep_the_sai_names(tmp_path, tiny, sai_file):
    """merge-loras sums two kohya files; resize to the true rank is exact; extract of W + ΔW − W gives ΔW back."""
    _, sai = tiny
    a, b = sai_lora(1, rank=2), sai_lora(2, rank=2)
    save_file(kohya_sd(a), str(tmp_path / "a.safetensors"))
    save_file(kohya_sd(b), str(tmp_path / "b.safetensors"))
    merge_loras([(tmp_path / "a.safetensors", 1.0), (tmp_path / "b.safetensors", -0.5)], tmp_path / "ab.safetensors",
                "concat", None, torch.device("cpu"), no_hash, checkpoint=sai_file)
    ab = sai_deltas(load_file(tmp_path / "ab.safetensors"), "lora_down", "lora_up", "lora_unet_")
    expected = reference_deltas(a)
    for key, delta in reference_deltas({n: (d, u, -0.5 * al) for n, (d, u, al) in b.items()}).items():
        expected[key] = expected.get(key, 0) + delta
    assert_same(reference_deltas(ab), expected)

    resize_lora(tmp_path / "ab.safetensors", tmp_path / "r.safetensors", Rank(8), torch.device("cpu"), no_hash)
    resized = sai_deltas(load_file(tmp_path / "r.safetensors"), "lora_down", "lora_up", "lora_unet_")
    assert_same(reference_deltas(resized), expected, rel=1e-5)

    tuned = dict(sai)
    for name, (d, u, al) in a.items():
        tuned[f"{name}.weight"] = sai[f"{name}.weight"] + u @ d * (al / d.shape[0])
    save_file({LDM + k: v.contiguous() for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    extract_lora(sai_file, tmp_path / "tuned.safetensors", tmp_path / "x.safetensors", 3, torch.device("cpu"),
                 no_hash)
    got = reference_deltas(sai_deltas(load_file(tmp_path / "x.safetensors"), "lora_down", "lora_up", "lora_unet_"))
    assert_same(got, reference_deltas(a), rel=1e-4)


def test_the_commands_as_a_user_runs_them(tmp_path, sai_file, capsys, monkeypatch):
    from cli_helpers import run

    save_file(kohya_sd(sai_lora()), str(tmp_path / "k.safetensors"))
    code, out, _ = run(["probe", str(sai_file), "--json"], capsys, monkeypatch)
    found = json.loads(out)
    assert code == 0 and (found["base"], found["details"]["variant"]) == ("sd35", "medium")
    code, out, err = run(["convert", str(tmp_path / "k.safetensors"), "-o", str(tmp_path / "c.safetensors"),
                          "--to", "comfy", "--checkpoint", str(sai_file)], capsys, monkeypatch)
    assert code == 0, err
    assert all(k.startswith("diffusion_model.joint_blocks.") for k in load_file(tmp_path / "c.safetensors")
               if "embedder" not in k and "final_layer" not in k)
    code, _, err = run(["merge", str(sai_file), "--lora", str(tmp_path / "c.safetensors"), "-o",
                        str(tmp_path / "m.safetensors")], capsys, monkeypatch)
    assert code == 0, err
    assert math.isfinite(float(load_file(tmp_path / "m.safetensors")[LDM + "final_layer.linear.weight"].sum()))


def test_text_encoder_modules_keep_kohya_s_names_both_ways(tmp_path):
    """sd-scripts' lora_te1 (CLIP-L), lora_te2 (CLIP-G) and lora_te3 (T5) names read onto the pipeline's text
    encoders and are written back as they were; diffusers output names them by the encoders' module paths, which
    diffusers' loader matches with or without `text_model.`."""
    gen = torch.Generator().manual_seed(5)
    sd = {}
    for stem, width in (("lora_unet_joint_blocks_0_x_block_attn_qkv", 2432),
                        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768),
                        ("lora_te2_text_model_encoder_layers_31_mlp_fc1", 1280),
                        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 4096)):
        out = 3 * width if stem.endswith("qkv") else 5120 if stem.endswith("fc1") else width
        sd |= {f"{stem}.lora_down.weight": torch.randn(2, width, generator=gen),
               f"{stem}.lora_up.weight": torch.randn(out, 2, generator=gen), f"{stem}.alpha": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "te.safetensors"))
    convert_lora(tmp_path / "te.safetensors", tmp_path / "k.safetensors", "kohya")
    assert sorted(load_file(tmp_path / "k.safetensors")) == sorted(sd)
    convert_lora(tmp_path / "te.safetensors", tmp_path / "d.safetensors", "diffusers")
    written = [k.replace("text_model.", "") for k in load_file(tmp_path / "d.safetensors")]
    assert {"text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight",
            "text_encoder_2.encoder.layers.31.mlp.fc1.lora_B.weight",
            "text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"} <= set(written)
