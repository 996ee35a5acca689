"""`roots`: folders added by hand or read from ComfyUI, A1111/Forge and InvokeAI configs; a bare `scan`
rescans them and leaves an unplugged one alone (issue 14 §2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from library_layout import locations, side_by_side


@pytest.fixture
def library(tmp_path: Path) -> dict[str, Path]:
    return side_by_side(tmp_path / "sd")


def test_roots_import_reads_every_comfyui_section_a1111_dirs_and_invokeai(tmp_path, library, cli, monkeypatch,
                                                                         registry_db):
    comfy, a1111 = library["comfyui"], library["a1111"]
    monkeypatch.setenv("MODELS_HOME", str(tmp_path / "store"))
    (tmp_path / "store" / "loras").mkdir(parents=True)
    (comfy / "extra_model_paths.yaml").write_text(
        "a111:\n"
        "    base_path: ../stable-diffusion-webui/\n"  # relative to the YAML's folder, as ComfyUI resolves it
        "    checkpoints: models/Stable-diffusion\n"
        "    loras: |\n"
        "         models/Lora\n"
        "         models/LyCORIS\n"
        "    embeddings: embeddings\n"
        "    configs: models/Stable-diffusion\n"
        "store:\n"
        "    base_path: $MODELS_HOME\n"
        "    is_default: true\n"
        "    loras: loras/\n"
        "    upscale_models: upscale\n")
    (a1111 / "webui-user.sh").write_text('#!/bin/bash\n#export COMMANDLINE_ARGS=""\n'
                                         f'export COMMANDLINE_ARGS="--xformers --lora-dir \'{tmp_path}/my loras\' '
                                         '--embeddings-dir=embeddings --ckpt-dir /no/such/folder"\n')
    (tmp_path / "my loras").mkdir()
    invoke = tmp_path / "invokeai"
    (invoke / "models").mkdir(parents=True)
    (invoke / "invokeai.yaml").write_text("# Internal metadata\nschema_version: 4.0.2\n\nprecision: float16\n")

    rows = cli.json("roots", "import", comfy, a1111 / "webui-user.sh", invoke / "invokeai.yaml")
    got = {(Path(r["path"]).relative_to(tmp_path).as_posix() if r["path"].startswith(str(tmp_path)) else r["path"],
            r["layout"], r["kind"], r["status"]) for r in rows}
    assert got == {
        ("sd/ComfyUI/models", "comfyui", None, "added"),  # the install's own models folder
        ("sd/stable-diffusion-webui/models/Stable-diffusion", "comfyui", "checkpoint", "not found"),
        ("sd/stable-diffusion-webui/models/Lora", "comfyui", "lora", "added"),
        ("sd/stable-diffusion-webui/models/LyCORIS", "comfyui", "lora", "not found"),
        ("sd/stable-diffusion-webui/embeddings", "comfyui", "embedding", "added"),
        ("store/loras", "comfyui", "lora", "added"),
        ("store/upscale", "comfyui", None, "not found"),
        ("sd/stable-diffusion-webui", "a1111", None, "added"),
        ("my loras", "a1111", "lora", "added"),
        ("sd/stable-diffusion-webui/embeddings", "comfyui", "embedding", "already"),  # as ComfyUI's, first
        ("/no/such/folder", "a1111", "checkpoint", "not found"),
        ("invokeai/models", "invoke", None, "added"),
    }
    listed = cli.json("roots", "list")
    assert len(listed) == 7 and all(r["host"] == "a" and r["exists"] for r in listed)
    labels = {Path(r["path"]).name: r["label"] for r in listed}
    assert labels["Lora"] == "extra_model_paths.yaml a111 loras" and labels["my loras"] == "--lora-dir"

    # A bare scan rescans every root: nested ones once.
    report = cli.json("scan")
    names = sorted(Path(f["path"]).name for f in report["files"])
    assert names == ["badhands.safetensors", "castle.safetensors", "castle.safetensors", "style-retagged.safetensors",
                     "style.safetensors", "style.safetensors"]
    assert report["indexed"] == 6 and report["roots_not_found"] == []
    by_root = {Path(r["path"]).relative_to(tmp_path).as_posix(): r["files"] for r in cli.json("roots", "list")}
    assert by_root == {"sd/ComfyUI/models": 3, "sd/stable-diffusion-webui/models/Lora": 2,  # the innermost root
                       "sd/stable-diffusion-webui/embeddings": 1, "store/loras": 0, "sd/stable-diffusion-webui": 0,
                       "my loras": 0, "invokeai/models": 0}


def test_an_a1111_command_line_and_a_bat_file(tmp_path, cli, monkeypatch):
    (tmp_path / "loras").mkdir()
    monkeypatch.chdir(tmp_path)
    rows = cli.json("roots", "import", "--a1111-args", "--lora-dir loras --hypernetwork-dir=hn", "--dry-run")
    assert [(r["path"], r["kind"], r["status"]) for r in rows] == [
        (str(tmp_path / "loras"), "lora", "would add"), (str(tmp_path / "hn"), "hypernetwork", "not found")]
    assert cli.json("roots", "list") == []  # a dry run adds nothing
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "webui-user.bat").write_text('@echo off\r\nset COMMANDLINE_ARGS=--data-dir "C:\\SD Data" --medvram\r\n')
    (rows,) = [cli.json("roots", "import", webui, "--dry-run")]
    assert [(r["path"], r["kind"], r["label"]) for r in rows] == [
        (str(webui / "C:\\SD Data"), None, "A1111 data folder")]  # a Windows path: the .bat's quoting, kept whole


def test_a_bare_scan_leaves_an_unplugged_root_alone(tmp_path, library, cli):
    cli("roots", "add", library["a1111"])
    code, out, _ = cli("roots", "add", library["comfyui"] / "models")
    assert code == 0 and out.startswith("added     root 2 (a, comfyui)")
    assert cli("roots", "add", library["comfyui"] / "models")[1].startswith("already")
    layouts = {Path(r["path"]).name: r["layout"] for r in cli.json("roots", "list")}
    assert layouts == {"stable-diffusion-webui": "a1111", "models": "comfyui"}  # guessed from what is in them
    assert cli.json("scan")["indexed"] == 6
    unplugged = library["comfyui"].rename(tmp_path / "elsewhere")
    code, out, _ = cli("scan")
    assert code == 0
    assert f"not found: {library['comfyui'] / 'models'}: root skipped (unplugged?)" in out
    assert out.splitlines()[-1] == "0 indexed, 3 unchanged, 0 broken, 0 unsafe, 0 missing"
    entries = {e["name"]: e for e in cli.json("list")}
    assert not any(locations(entries["style-retagged.safetensors"]).values())  # not marked missing
    unplugged.rename(library["comfyui"])
    assert cli.json("scan")["unchanged"] == 6


def test_removing_a_root_keeps_its_files_and_a_scan_with_no_root_is_a_usage_error(library, cli):
    code, _, err = cli("scan")
    assert code == 2 and "add roots first" in err
    cli("roots", "add", library["a1111"], "--layout", "a1111")
    cli("roots", "add", library["comfyui"], "--layout", "comfyui")
    cli.json("scan")
    removed = cli.json("roots", "remove", library["comfyui"])
    assert (removed["status"], removed["locations"]) == ("removed", 3)
    assert len(cli.json("roots", "list")) == 1
    assert len(cli.json("list")) == 5  # the registry still knows every file
    assert cli.json("scan")["unchanged"] == 3  # only A1111 is rescanned
    code, _, err = cli("roots", "remove", "99")
    assert code == 1 and "no root '99'" in err
    code, _, err = cli("roots", "add", library["root"] / "nowhere")
    assert code == 1 and err.startswith("error: ") and "no such folder" in err
