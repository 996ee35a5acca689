"""`adapterzoo updates` against the fake Civitai, on an A1111 library and a ComfyUI folder side by side that
hold the same LoRA: newer versions per model, asked for in one batched request, with the ignore list."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run
from factory import small_lora
from fake_civitai import FakeCivitai

from adapterzoo.zoo.civitai import CivitaiClient


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def updates_json(args: list[str], capsys, monkeypatch) -> dict[str, dict[str, Any]]:
    code, out, err = run(["updates", *args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    return {m["model_name"]: m for m in json.loads(out)}


def model_listings(fake: FakeCivitai) -> list[dict]:
    return [r for r in fake.requests if r["path"] == "/api/v1/models"]


@pytest.fixture
def library(fake_civitai: FakeCivitai, tmp_path: Path, capsys, monkeypatch) -> dict[str, Any]:
    """Knight v1 pulled into an A1111 library and copied into a ComfyUI folder; Civitai has four newer versions
    (SD 1.5, SDXL 1.0, one in early access, one whose early access is over). Castle (NSFW) v1 enriched, and
    its v2's file already in another folder without a source."""
    src = tmp_path / "src"
    now = datetime.now(timezone.utc)
    knight = fake_civitai.add_model("Tiny Knight", [small_lora(src / "knight.safetensors", seed=1)])
    v2 = fake_civitai.add_version(knight, [small_lora(src / "knight_v2.safetensors", seed=2)], "SD 1.5", [])
    v3 = fake_civitai.add_version(knight, [small_lora(src / "knight_xl.safetensors", seed=3)], "SDXL 1.0", [],
                                  name="XL")
    v4 = fake_civitai.add_version(knight, [small_lora(src / "knight_v4.safetensors", seed=4)], "SD 1.5", [],
                                  name="v4.0", early_access_ends=iso(now + timedelta(days=7)))
    v5 = fake_civitai.add_version(knight, [small_lora(src / "knight_v5.safetensors", seed=5)], "SD 1.5", [],
                                  name="v5.0", early_access_ends=iso(now - timedelta(days=1)))
    castle = fake_civitai.add_model("Tiny Castle", [small_lora(src / "castle.safetensors", seed=6)], nsfw=True)
    castle_v2 = fake_civitai.add_version(castle, [small_lora(src / "castle_v2.safetensors", seed=7)], "SD 1.5", [])

    a1111, comfy, other = tmp_path / "a1111", tmp_path / "comfy", tmp_path / "other"
    code, _, err = run(["pull", f"civitai:{knight.versions[-1].id}", "--library", str(a1111)], capsys, monkeypatch)
    assert code == 0, err
    (comfy / "models" / "loras").mkdir(parents=True)
    shutil.copyfile(a1111 / "models" / "Lora" / "knight.safetensors", comfy / "models" / "loras" / "knight.safetensors")
    shutil.copyfile(src / "castle.safetensors", comfy / "models" / "loras" / "castle.safetensors")
    other.mkdir()
    shutil.copyfile(src / "castle_v2.safetensors", other / "castle_v2.safetensors")
    assert run(["scan", str(comfy), str(other)], capsys, monkeypatch)[0] == 0
    assert run(["enrich", str(comfy / "models" / "loras" / "castle.safetensors")], capsys, monkeypatch)[0] == 0
    fake_civitai.requests.clear()
    return {"fake": fake_civitai, "knight": knight, "castle": castle, "v1": knight.versions[-1].id, "v2": v2.id,
            "v3": v3.id, "v4": v4.id, "v5": v5.id, "castle_v2": castle_v2.id, "a1111": a1111, "comfy": comfy,
            "other": other}


def test_updates_lists_newer_versions_once_per_model_from_one_batched_request(registry_db, library, capsys,
                                                                              monkeypatch) -> None:
    fake, knight, castle = library["fake"], library["knight"], library["castle"]
    models = updates_json([], capsys, monkeypatch)
    assert set(models) == {"Tiny Knight", "Tiny Castle"}  # the LoRA in both UIs' folders is one model

    mine = models["Tiny Knight"]
    assert (mine["model_id"], mine["kind"], mine["status"]) == (knight.id, "lora", "update")
    assert mine["yours"] == {
        "version_id": library["v1"], "version_name": "v1.0", "base": "sd1", "base_stated": "SD 1.5",
        "paths": sorted([str(library["a1111"] / "models" / "Lora" / "knight.safetensors"),
                         str(library["comfy"] / "models" / "loras" / "knight.safetensors")])}
    # newest first; v4 is still in early access, v5's early access is over
    assert [o["version_id"] for o in mine["newer"]] == [library["v5"], library["v3"], library["v2"]]
    xl = mine["newer"][1]
    assert (xl["version_name"], xl["base"], xl["base_stated"], xl["file_name"], xl["early_access"]) == (
        "XL", "sdxl", "SDXL 1.0", "knight_xl.safetensors", False)
    assert xl["size"] == knight.versions[2].files[0][1].__len__() and xl["published"] == knight.versions[2].created
    assert xl["pull"] == f"adapterzoo pull civitai:{library['v3']}"

    castle_row = models["Tiny Castle"]  # v2's file is already in the registry (no source): it is yours, not new
    assert (castle_row["status"], castle_row["yours"]["version_id"], castle_row["newer"]) == (
        "up to date", library["castle_v2"], [])
    assert castle_row["yours"]["paths"] == [str(library["other"] / "castle_v2.safetensors")]

    (asked,) = model_listings(fake)  # both models in one request; NSFW asked for, as Civitai hides it by default
    assert asked["query"]["ids"] == [",".join(str(i) for i in sorted((knight.id, castle.id)))]
    assert asked["query"]["nsfw"] == ["true"] and len(fake.requests) == 1


def test_same_base_and_early_access_in_the_table_with_the_pull_command(library, capsys, monkeypatch) -> None:
    code, out, err = run(["updates", "--same-base", "--include-early-access"], capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "YOURS", "NEWER", "BASE", "DATE", "SIZE", "GET", "NOTE"]
    rows = lines[1:-1]
    assert [r.split("adapterzoo pull ")[1].split()[0] for r in rows] == [
        f"civitai:{library['v5']}", f"civitai:{library['v4']}", f"civitai:{library['v2']}"]  # no SDXL
    assert all(r.startswith(f"Tiny Knight ({library['knight'].id})  v1.0 ({library['v1']})") for r in rows)
    assert "early access until " in rows[1] and "early access" not in rows[0] + rows[2]
    assert " SD 1.5 " in rows[2] and " KiB " in rows[2] and " 2024-01-02 " in rows[2]
    assert lines[-1] == "2 models: 1 with updates, 1 up to date"


def test_pulling_an_update_makes_it_yours_and_only_newer_ones_stay(library, capsys, monkeypatch) -> None:
    code, _, err = run(["pull", f"civitai:{library['v2']}", "--library", str(library["a1111"])], capsys, monkeypatch)
    assert code == 0, err
    mine = updates_json([], capsys, monkeypatch)["Tiny Knight"]
    assert mine["yours"]["version_id"] == library["v2"]
    assert [o["version_id"] for o in mine["newer"]] == [library["v5"], library["v3"]]


def test_ignore_a_version_or_a_whole_model_and_offer_it_again(library, capsys, monkeypatch) -> None:
    fake, knight, castle = library["fake"], library["knight"], library["castle"]
    code, out, _ = run(["updates", "ignore", f"civitai:{library['v3']}", f"model/{castle.id}"], capsys, monkeypatch)
    assert code == 0
    assert out.split() == ["ignored", f"civitai:{library['v3']}", "ignored", f"civitai:model/{castle.id}"]
    code, out, _ = run(["updates", "ignore", str(library["v3"])], capsys, monkeypatch)
    assert out.split() == ["already", "ignored", f"civitai:{library['v3']}"]
    code, out, _ = run(["updates", "ignore", "--json"], capsys, monkeypatch)
    assert json.loads(out) == [{"target": "model", "id": castle.id, "ref": f"civitai:model/{castle.id}"},
                               {"target": "version", "id": library["v3"], "ref": f"civitai:{library['v3']}"}]

    fake.requests.clear()
    models = updates_json([], capsys, monkeypatch)
    assert [o["version_id"] for o in models["Tiny Knight"]["newer"]] == [library["v5"], library["v2"]]
    assert models["Tiny Castle"]["status"] == "ignored"
    assert [r["query"]["ids"] for r in model_listings(fake)] == [[str(knight.id)]]  # an ignored model is not asked

    code, out, err = run(["updates", "unignore", f"civitai:{library['v3']}", "civitai:999999"], capsys, monkeypatch)
    assert (code, out) == (1, "") and err == "error: not on the ignore list: civitai:999999; nothing was changed\n"
    code, out, _ = run(["updates", "unignore", f"civitai:{library['v3']}"], capsys, monkeypatch)
    assert code == 0 and out.split() == ["offered", "again", f"civitai:{library['v3']}"]
    assert library["v3"] in [o["version_id"] for o in updates_json([], capsys, monkeypatch)["Tiny Knight"]["newer"]]

    code, _, err = run(["updates", "ignore", str(knight.id)], capsys, monkeypatch)  # a model id given as a version
    assert code == 0 and err == (f"note: {knight.id} is the id of the model Tiny Knight, not of one of its versions; "
                                 f"`updates ignore model/{knight.id}` ignores the model\n")
    code, out, err = run(["updates", "ignore", "knight"], capsys, monkeypatch)
    assert code == 1 and out == "" and err.startswith("error: not a Civitai model or version: 'knight' (give ")

    run(["updates", "unignore", f"model/{castle.id}"], capsys, monkeypatch)
    del fake.models[castle.id]  # taken down on Civitai
    code, out, _ = run(["updates"], capsys, monkeypatch)
    assert out.splitlines()[-1] == "2 models: 1 with updates, 0 up to date, 1 no longer on Civitai"


def test_429_is_waited_out_one_request_at_a_time(library, capsys, monkeypatch) -> None:
    fake = library["fake"]
    fake.throttle(1, retry_after="0")
    assert updates_json([], capsys, monkeypatch)["Tiny Knight"]["status"] == "update"
    assert len(model_listings(fake)) == 2 and fake.most_active == 1


def test_without_network_it_is_one_line_and_the_registry_is_unchanged(library, registry_home: Path, capsys,
                                                                     monkeypatch) -> None:
    run(["updates", "ignore", f"civitai:{library['v3']}"], capsys, monkeypatch)

    def dump() -> list[str]:
        with sqlite3.connect(registry_home / "registry.db") as connection:
            return list(connection.iterdump())

    before = dump()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CIVITAI_BASE_URL", f"http://127.0.0.1:{port}")
    code, out, err = run(["updates"], capsys, monkeypatch)
    assert (code, out) == (1, "")
    assert err == f"error: no network: could not reach 127.0.0.1:{port} (connection refused)\n"
    assert dump() == before


def test_a_registry_without_civitai_sources_asks_nothing(fake_civitai: FakeCivitai, tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    small_lora(tmp_path / "loras" / "mine.safetensors")
    run(["scan", str(tmp_path / "loras")], capsys, monkeypatch)
    code, out, _ = run(["updates"], capsys, monkeypatch)
    assert code == 0 and "no file in the registry has a Civitai source" in out
    assert updates_json([], capsys, monkeypatch) == {} and fake_civitai.requests == []


def test_models_are_asked_for_at_most_100_per_request(fake_civitai: FakeCivitai) -> None:
    assert list(CivitaiClient().models_by_id(range(1, 151))) == []
    assert [len(r["query"]["ids"][0].split(",")) for r in model_listings(fake_civitai)] == [100, 50]
