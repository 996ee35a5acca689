"""HunyuanVideo, LTX-2, HiDream and Lumina 2 at probe level: checkpoints in their single-file and diffusers layouts,
LoRAs in each dialect, from the real-size key lists in tests/fixtures/<family>_keys (headers only: sparse files);
what is not read yet is refused in one line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import factory
import pytest

from adapterzoo.formats.probe import probe

FIXTURES = Path(__file__).parent / "fixtures"
LDM = "model.diffusion_model."
RANK = 4


def keys(family: str, name: str) -> dict[str, tuple[int, ...]]:
    raw = json.loads(gzip.decompress((FIXTURES / f"{family}_keys" / f"{name}.json.gz").read_bytes()))
    return {k: tuple(v) for k, v in raw.items()}


def checkpoint(tmp_path: Path, shapes: dict, prefix: str = "", name: str = "ckpt.safetensors") -> Path:
    return factory.write_sparse_safetensors(tmp_path / name, {prefix + k: ("BF16", s) for k, s in shapes.items()})


def lora(tmp_path: Path, shapes: dict, dialect: str, where: str = "", name: str = "lora.safetensors") -> Path:
    """A rank-4 LoRA on every Linear of `shapes` whose name contains `where`, spelled as `dialect` spells it."""
    specs = {}
    for key, shape in shapes.items():
        if not key.endswith(".weight") or len(shape) != 2 or where not in key:
            continue
        stem = key.removesuffix(".weight")
        if dialect == "kohya":
            flat = "lora_unet_" + stem.replace(".", "_")
            specs |= {f"{flat}.lora_down.weight": ("F16", (RANK, shape[1])),
                      f"{flat}.lora_up.weight": ("F16", (shape[0], RANK)), f"{flat}.alpha": ("F32", ())}
        else:
            prefix = {"comfy": "diffusion_model.", "diffusers": "transformer."}[dialect]
            specs |= {f"{prefix}{stem}.lora_A.weight": ("F16", (RANK, shape[1])),
                      f"{prefix}{stem}.lora_B.weight": ("F16", (shape[0], RANK))}
    return factory.write_sparse_safetensors(tmp_path / name, specs)


@pytest.mark.parametrize("family,name,prefix,expected", [
    ("hunyuan_video", "hunyuan_video_t2v", "", {"format": "ldm", "version": "1.0", "variant": "t2v"}),
    ("hunyuan_video", "hunyuan_video_t2v", LDM, {"format": "ldm", "version": "1.0", "variant": "t2v"}),
    ("hunyuan_video", "hunyuan_video_i2v", "", {"format": "ldm", "version": "1.0", "variant": "i2v"}),
    ("hunyuan_video", "hunyuan_video_t2v_diffusers", "", {"format": "diffusers", "variant": "t2v", "width": 3072}),
    ("hunyuan_video", "hunyuan_video_1_5_diffusers", "", {"format": "diffusers", "version": "1.5", "width": 2048}),
    ("ltx2", "ltx2_19b", LDM, {"format": "ldm", "variant": "2.0", "width": 4096, "blocks": 48}),
    ("ltx2", "ltx2_19b_diffusers", "", {"format": "diffusers", "variant": "2.0"}),
    ("hidream", "hidream_i1", LDM, {"format": "ldm", "width": 2560, "double_stream_blocks": 16, "experts": 4}),
    ("hidream", "hidream_i1", "", {"format": "diffusers", "single_stream_blocks": 32}),
    ("lumina2", "lumina2", LDM, {"format": "ldm", "width": 2304, "caption_width": 2304, "layers": 26}),
    ("lumina2", "lumina2_diffusers", "", {"format": "diffusers", "width": 2304}),
])
def test_probe_names_each_checkpoint_layout_from_its_header(tmp_path, family, name, prefix, expected):
    found = probe(checkpoint(tmp_path, keys(family, name), prefix))
    assert (found.kind, found.base, found.dtype) == ("checkpoint", family, "bf16"), found.warnings
    assert {k: found.format if k == "format" else found.details.get(k) for k in expected} == expected
    assert not found.warnings


def test_a_diffusers_transformer_folder_and_a_pipeline_folder_are_read_too(tmp_path):
    folder = tmp_path / "pipe" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "LTX2VideoTransformer3DModel"}))
    checkpoint(folder, keys("ltx2", "ltx2_19b_diffusers"), name="diffusion_pytorch_model.safetensors")
    assert (probe(folder).base, probe(folder).format) == ("ltx2", "diffusers")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({
        "_class_name": "LTX2Pipeline", "transformer": ["diffusers", "LTX2VideoTransformer3DModel"]}))
    assert (probe(tmp_path / "pipe").kind, probe(tmp_path / "pipe").base) == ("checkpoint", "ltx2")


def test_hunyuan_image_with_the_same_refiner_is_not_hunyuan_video(tmp_path):
    shapes = {k: s for k, s in keys("hunyuan_video", "hunyuan_video_t2v").items() if not k.startswith("vector_in")}
    shapes["byt5_in.fc1.weight"] = (2048, 1472)
    assert probe(checkpoint(tmp_path, shapes)).base != "hunyuan_video"


@pytest.mark.parametrize("family,name,dialect,where,coverage", [
    ("hunyuan_video", "hunyuan_video_t2v", "comfy", "blocks.", {"double_blocks": list(range(20)),
                                                               "single_blocks": list(range(40))}),
    ("hunyuan_video", "hunyuan_video_t2v", "kohya", "_blocks.", {"double_blocks": list(range(20))}),
    ("hunyuan_video", "hunyuan_video_t2v_diffusers", "diffusers", "blocks.", {"single_blocks": list(range(40))}),
    ("ltx2", "ltx2_19b", "comfy", "", {"audio": True, "transformer_blocks": list(range(48))}),
    ("ltx2", "ltx2_19b_diffusers", "diffusers", "audio_attn1", {"audio": True}),
    ("hidream", "hidream_i1", "diffusers", "blocks.", {"double_stream_blocks": list(range(16)), "experts": True}),
    ("hidream", "hidream_i1", "comfy", "attn1", {"single_stream_blocks": list(range(32)), "experts": False}),
    ("hidream", "hidream_i1", "kohya", "attn1", {"double_stream_blocks": list(range(16))}),
    ("lumina2", "lumina2", "comfy", "", {"layers": list(range(26)), "noise_refiner": [0, 1]}),
    ("lumina2", "lumina2", "kohya", "attention", {"context_refiner": [0, 1]}),
    ("lumina2", "lumina2_diffusers", "diffusers", "layers.", {"layers": list(range(26)), "noise_refiner": []}),
])
def test_probe_names_base_dialect_and_coverage_of_each_lora(tmp_path, family, name, dialect, where, coverage):
    found = probe(lora(tmp_path, keys(family, name), dialect, where))
    assert (found.kind, found.base, found.format, found.rank) == ("lora", family, dialect, RANK)
    assert {k: found.details["coverage"][k] for k in coverage} == coverage


def test_what_the_names_cannot_tell_is_said(tmp_path):
    """HunyuanVideo attention in the blocks Flux.1 has too is Flux.1's by name and shape; LTX-2's video stream
    alone is LTX-Video 13B's too (a warning); a NextDiT 3840 wide (Z-Image) is not Lumina 2."""
    hunyuan = {k: s for k, s in keys("hunyuan_video", "hunyuan_video_t2v").items()
               if "img_attn_proj" in k and int(k.split(".")[1]) < 19}
    assert probe(lora(tmp_path, hunyuan, "kohya", name="h.safetensors")).base == "flux"
    video = probe(lora(tmp_path, keys("ltx2", "ltx2_19b_diffusers"), "diffusers", ".attn1.", name="v.safetensors"))
    assert video.base == "ltx2" and any("LTX-Video 13B" in w for w in video.warnings)
    nextdit = {f"layers.{i}.attention.qkv.weight": (3 * 3840, 3840) for i in range(2)}
    assert probe(lora(tmp_path, nextdit, "comfy", name="z.safetensors")).base != "lumina2"


def test_convert_and_merge_refuse_in_one_line_saying_why(tmp_path, capsys, monkeypatch):
    from cli_helpers import run

    source = lora(tmp_path, keys("ltx2", "ltx2_19b"), "comfy", "audio_attn1")
    code, _, err = run(["convert", str(source), "-o", str(tmp_path / "out.safetensors"), "--to", "diffusers"],
                       capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "LTX-2 files are recognised, but their LoRAs are not read yet" in err
    model = checkpoint(tmp_path, keys("hidream", "hidream_i1"), LDM, "hidream.safetensors")
    code, _, err = run(["merge", str(model), "--lora", str(source), "-o", str(tmp_path / "m.safetensors")],
                       capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "is a hidream checkpoint" in err
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


def test_resize_needs_no_module_table(tmp_path):
    """A kohya-dialect LoRA of a family read at probe level resizes: resize is factor math on its own keys."""
    import torch
    from safetensors.torch import load_file, save_file

    from adapterzoo.ops.lowrank import Rank
    from adapterzoo.ops.resize import resize_lora

    gen = torch.Generator().manual_seed(0)
    stem = "lora_unet_double_stream_blocks_0_block_attn1_to_q"
    down, up = torch.randn(2, 2560, generator=gen), torch.randn(2560, 2, generator=gen)
    save_file({f"{stem}.lora_down.weight": torch.cat([down, down]), f"{stem}.lora_up.weight": torch.cat([up, up], 1),
               f"{stem}.alpha": torch.tensor(4.0)}, str(tmp_path / "hidream.safetensors"))
    assert probe(tmp_path / "hidream.safetensors").base == "hidream"
    resize_lora(tmp_path / "hidream.safetensors", tmp_path / "r.safetensors", Rank(2), torch.device("cpu"),
                lambda path: "0" * 64)
    out = load_file(tmp_path / "r.safetensors")
    delta = out[f"{stem}.lora_up.weight"] @ out[f"{stem}.lora_down.weight"] * (float(out[f"{stem}.alpha"]) / 2)
    assert out[f"{stem}.lora_down.weight"].shape[0] == 2
    assert torch.allclose(delta, 2 * up @ down, rtol=1e-4, atol=1e-3)
