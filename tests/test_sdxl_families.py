"""SDXL's families (Pony, Illustrious, NoobAI) from a file's metadata, else its Civitai label; Civitai's baseModel
labels of the newer families; a label the tensors contradict is a warning in enrich and show, never trusted."""

from __future__ import annotations

import json
from pathlib import Path

import factory
import pytest
from cli_helpers import run
from fake_civitai import FakeCivitai

from adapterzoo.formats.probe import probe
from adapterzoo.zoo.civitai import base_of

ATTN2 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"  # 2048-wide context: SDXL's


def sdxl_lora(path: Path, metadata: dict[str, str] | None = None) -> Path:
    specs = {f"{ATTN2}.lora_down.weight": ("F16", (4, 2048)), f"{ATTN2}.lora_up.weight": ("F16", (640, 4)),
             f"{ATTN2}.alpha": ("F32", ())}
    path.parent.mkdir(parents=True, exist_ok=True)
    return factory.write_sparse_safetensors(path, specs, metadata)


@pytest.mark.parametrize("metadata,family,where", [
    ({}, "sdxl", None),
    ({"ss_sd_model_name": "ponyDiffusionV6XL_v6StartWithThisOne.safetensors"}, "pony", "ss_sd_model_name"),
    ({"ss_sd_model_name": "autismmixSDXL_autismmixPony.safetensors"}, "pony", "ss_sd_model_name"),
    ({"ss_sd_model_name": "illustriousXL_v01.safetensors"}, "illustrious", "ss_sd_model_name"),
    ({"ss_sd_model_name": "noobaiXLNAIXL_vPred10Version.safetensors"}, "noobai", "ss_sd_model_name"),
    ({"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}, "sdxl", "ss_sd_model_name"),
    ({"modelspec.title": "Pony Diffusion style", "ss_sd_model_name": "illustriousXL_v01.safetensors"},
     "illustrious", "ss_sd_model_name"),  # a LoRA's ModelSpec title is its own name, not its base's
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora", "ss_sd_model_name": "NoobAI-XL-v1.1.safetensors"},
     "noobai", "ss_sd_model_name"),
])
def test_probe_reads_an_sdxl_lora_s_family_from_its_metadata(tmp_path, metadata, family, where):
    found = probe(sdxl_lora(tmp_path / "l.safetensors", metadata))
    assert (found.base, found.details["family"], found.details["family_from"]) == ("sdxl", family, where)


def test_a_checkpoint_s_modelspec_title_names_its_family_before_kohya_notes(tmp_path):
    specs = factory.sd_checkpoint_specs("sdxl")
    path = factory.write_sparse_safetensors(tmp_path / "c.safetensors", specs, {
        "modelspec.title": "NoobAI XL v1.1", "ss_sd_model_name": "ponyDiffusionV6XL.safetensors"})
    found = probe(path)
    assert (found.kind, found.base, found.details["family"], found.details["family_from"]) == (
        "checkpoint", "sdxl", "noobai", "modelspec.title")


def test_civitai_labels_map_onto_the_bases():
    assert {label: base_of(label) for label in (
        "SD 3", "SD 3.5", "SD 3.5 Large", "SD 3.5 Large Turbo", "SD 3.5 Medium", "Pony", "Illustrious", "NoobAI",
        "SDXL Lightning", "Pony V7", "LTXV2", "LTXV", "HiDream", "Lumina", "Hunyuan Video", "Hunyuan 1")} == {
        "SD 3": "sd3", "SD 3.5": "sd35", "SD 3.5 Large": "sd35", "SD 3.5 Large Turbo": "sd35", "SD 3.5 Medium": "sd35",
        "Pony": "sdxl", "Illustrious": "sdxl", "NoobAI": "sdxl", "SDXL Lightning": "sdxl", "Pony V7": "unknown",
        "LTXV2": "ltx2", "LTXV": "unknown", "HiDream": "hidream", "Lumina": "lumina2",
        "Hunyuan Video": "hunyuan_video", "Hunyuan 1": "unknown"}


def test_list_family_takes_the_file_s_word_then_civitai_s_and_warns_where_they_differ(
        tmp_path, fake_civitai: FakeCivitai, capsys, monkeypatch):
    """Four SDXL LoRAs and an SD1 one: Pony by its training notes; Illustrious by its Civitai label only; Pony by
    its notes though Civitai calls it Illustrious (a warning); one nobody names; `list --base sdxl` finds all four."""
    folder = tmp_path / "models" / "Lora"
    sdxl_lora(folder / "pony.safetensors", {"ss_sd_model_name": "ponyDiffusionV6XL.safetensors"})
    labelled = sdxl_lora(folder / "labelled.safetensors", {"ss_output_name": "labelled"})
    lying = sdxl_lora(folder / "lying.safetensors", {"ss_sd_model_name": "ponyDiffusionV6XL_v6.safetensors"})
    plain = sdxl_lora(folder / "plain.safetensors")
    factory.small_lora(folder / "sd1.safetensors")
    fake_civitai.add_model("Labelled", [labelled], base_model="Illustrious")
    fake_civitai.add_model("Lying", [lying], base_model="Illustrious")
    fake_civitai.add_model("Wrong base", [plain], base_model="SD 3.5 Large")
    assert run(["scan", str(folder)], capsys, monkeypatch)[0] == 0
    code, out, err = run(["enrich", "--all"], capsys, monkeypatch)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning  the source says Illustrious (family illustrious) but the file is family pony (its ss_sd_model_name)",
        "warning  the source says base SD 3.5 Large but the file is sdxl"]

    def names(*args: str) -> list[str]:
        code, out, err = run(["list", *args, "--json"], capsys, monkeypatch)
        assert code == 0, err
        return sorted(row["name"] for row in json.loads(out))

    assert names("--base", "sdxl") == ["labelled.safetensors", "lying.safetensors", "plain.safetensors",
                                       "pony.safetensors"]
    assert names("--family", "illustrious") == ["labelled.safetensors"]
    assert names("--family", "pony") == ["lying.safetensors", "pony.safetensors"]
    assert names("--family", "sdxl") == ["plain.safetensors"]
    assert names("--family", "noobai") == []
    code, out, _ = run(["show", str(lying)], capsys, monkeypatch)
    assert "warning        the source says Illustrious (family illustrious) but the file is family pony" in out
    code, out, _ = run(["show", str(lying), "--json"], capsys, monkeypatch)
    assert json.loads(out)["source_warnings"] == [
        "the source says Illustrious (family illustrious) but the file is family pony (its ss_sd_model_name)"]
    code, _, err = run(["list", "--family", "flux"], capsys, monkeypatch)
    assert code == 2 and "flux" in err
