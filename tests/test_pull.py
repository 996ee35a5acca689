"""`adapterzoo pull` end to end against the fake Civitai (with its signed-URL storage) and the fake Hub.

The download engine's own cases (cuts, Range, throttling, names) are in test_download.py; these prove
the command wires them up: tokens, claims checked, registry, library placement, lock files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run
from factory import small_lora
from fake_civitai import TOKEN, FakeCivitai, tiny_png
from fake_hub import FakeHub
from fake_storage import FakeStorage, Served

from adapterzoo.cli import cli


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pull_json(args: list[str], capsys, monkeypatch) -> tuple[int, list[dict[str, Any]], str]:
    code, out, err = run(["pull", *args, "--json"], capsys, monkeypatch)
    return code, json.loads(out), err


def storage_requests(fake: FakeCivitai) -> list:
    return fake.storage.requests_to("storage")


@pytest.fixture
def knight(fake_civitai: FakeCivitai, tmp_path: Path) -> tuple[FakeCivitai, int, bytes]:
    """A LoRA on Civitai: (fake, version id, its bytes)."""
    lora = small_lora(tmp_path / "src" / "knight.safetensors", seed=1)
    model = fake_civitai.add_model("Tiny Knight", [lora], trained_words=["kn1ght"])
    return fake_civitai, model.versions[0].id, lora.read_bytes()


def test_a_civitai_version_is_pulled_with_the_token_kept_off_storage_and_registered_with_its_source(
        knight, tmp_path: Path, capsys, monkeypatch, registry_db: str) -> None:
    fake, version_id, data = knight
    code, outcomes, err = pull_json([f"civitai:{version_id}", "--dest", str(tmp_path / "dl"), "--token", TOKEN],
                                    capsys, monkeypatch)
    assert code == 0, err
    (outcome,) = outcomes
    landed = tmp_path / "dl" / "knight.safetensors"
    assert (outcome["status"], outcome["path"], outcome["kind"], outcome["base"]) == (
        "pulled", str(landed), "lora", "sd1")
    assert landed.read_bytes() == data and outcome["sha256"] == sha256(data)
    assert sorted(p.name for p in landed.parent.iterdir()) == ["knight.safetensors"]
    download = [r for r in fake.requests if r["path"].startswith("/api/download/")]
    assert [r["authorization"] for r in download] == [f"Bearer {TOKEN}"]
    assert [s.headers.get("Authorization") for s in storage_requests(fake)] == [None]

    code, out, _ = run(["show", str(landed), "--json"], capsys, monkeypatch)
    shown = json.loads(out)
    (source,) = shown["sources"]
    assert (source["provider"], source["civitai_version_id"], source["model_name"], source["trained_words"]) == (
        "civitai", version_id, "Tiny Knight", ["kn1ght"])
    assert (shown["kind"], shown["autov2"], shown["status"]) == ("lora", sha256(data)[:10], "ok")
    assert Path(source["preview_path"]).read_bytes() == tiny_png()


def test_without_a_token_each_ref_fails_in_one_line_and_the_others_are_still_pulled(
        knight, tmp_path: Path, capsys, monkeypatch) -> None:
    fake, version_id, _ = knight
    gated = fake.add_model("Gated", [small_lora(tmp_path / "g" / "gated.safetensors", seed=2)], needs_token=True)
    early = fake.add_model("Early", [small_lora(tmp_path / "e" / "early.safetensors", seed=3)],
                           download_needs_token=True)
    refs = [f"civitai:{gated.versions[0].id}", f"civitai:{early.versions[0].id}", f"civitai:{version_id}"]
    dest = tmp_path / "dl"
    code, out, err = run(["pull", *refs, "--dest", str(dest)], capsys, monkeypatch)
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == (f"failed        {refs[0]}: Civitai wants a token for /api/v1/model-versions/"
                        f"{gated.versions[0].id}: set CIVITAI_API_TOKEN or pass --token")
    assert lines[1] == (f"failed        {refs[1]}: Civitai answered with a web page, not a file: "
                        "this version needs a token, set CIVITAI_API_TOKEN")
    assert lines[2].startswith(f"pulled        {refs[2]}  {dest / 'knight.safetensors'}  (lora, sd1; AutoV2 ")
    assert sorted(p.name for p in dest.iterdir()) == ["knight.safetensors"]  # no login page saved, no .part

    (tmp_path / "a-file").write_text("not a folder")
    code, out, _ = run(["pull", refs[1], "--token", TOKEN, "--dest", str(tmp_path / "a-file" / "sub")], capsys,
                       monkeypatch)
    assert code == 1 and out == f"failed        {refs[1]}: Not a directory: {tmp_path / 'a-file' / 'sub'}\n"


def test_a_part_left_by_an_interrupted_pull_is_resumed_with_range(knight, tmp_path: Path, capsys, monkeypatch) -> None:
    fake, version_id, data = knight
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "knight.safetensors.part").write_bytes(data[:1000])
    code, (outcome,), err = pull_json([f"civitai:{version_id}", "--dest", str(dest)], capsys, monkeypatch)
    assert code == 0, err
    assert outcome["resumed_from"] == 1000 and (dest / "knight.safetensors").read_bytes() == data
    assert [s.headers.get("Range") for s in storage_requests(fake)] == ["bytes=1000-"]


def test_a_server_ignoring_range_restarts_cleanly(knight, tmp_path: Path, capsys, monkeypatch) -> None:
    fake, version_id, data = knight
    fake.served(version_id).ignore_range = True
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "knight.safetensors.part").write_bytes(b"\xff" * 1000)  # not even the file's bytes
    code, (outcome,), err = pull_json([f"civitai:{version_id}", "--dest", str(dest)], capsys, monkeypatch)
    assert code == 0, err
    assert outcome["sha256"] == sha256(data) and (dest / "knight.safetensors").read_bytes() == data


def test_wrong_bytes_are_refused_and_nothing_is_left(knight, tmp_path: Path, capsys, monkeypatch) -> None:
    fake, version_id, data = knight
    served = fake.served(version_id)
    served.data = data[:-1] + bytes([data[-1] ^ 1])  # same size, one bit off
    dest = tmp_path / "dl"
    code, out, err = run(["pull", f"civitai:{version_id}", "--dest", str(dest)], capsys, monkeypatch)
    assert code == 1
    assert f"is not the file expected: its SHA256 is {sha256(served.data)} but Civitai says {sha256(data)}" in out
    assert list(dest.iterdir()) == []
    assert json.loads(run(["list", "--json"], capsys, monkeypatch)[1]) == []


def test_429_then_a_hostile_name_lands_sanitised(knight, tmp_path: Path, capsys, monkeypatch) -> None:
    fake, version_id, data = knight
    served = fake.served(version_id)
    served.throttle = [(429, "0")]
    served.content_disposition = "attachment; filename*=UTF-8''..%2F..%2Fevil%E2%80%AEgpj.safetensors"
    dest = tmp_path / "deep" / "dl"
    code, (outcome,), err = pull_json([f"civitai:{version_id}", "--dest", str(dest)], capsys, monkeypatch)
    assert code == 0, err
    assert outcome["path"] == str(dest / "evilgpj.safetensors")
    assert list(tmp_path.rglob("*evil*")) == [dest / "evilgpj.safetensors"]
    assert len(storage_requests(fake)) == 2  # the 429, then the file


def test_a_plain_url_is_named_by_the_server_and_registered_with_it(tmp_path: Path, capsys, monkeypatch) -> None:
    data = small_lora(tmp_path / "src" / "x.safetensors", seed=6).read_bytes()
    with FakeStorage() as storage:
        url = storage.add("7", Served(data, content_disposition='attachment; filename="plain.safetensors"'))
        code, (outcome,), err = pull_json([url, "--dest", str(tmp_path / "dl")], capsys, monkeypatch)
    assert code == 0, err
    assert (outcome["path"], outcome["source_ref"], outcome["kind"]) == (
        str(tmp_path / "dl" / "plain.safetensors"), url, "lora")
    assert (tmp_path / "dl" / "plain.safetensors").read_bytes() == data
    (source,) = json.loads(run(["show", outcome["path"], "--json"], capsys, monkeypatch)[1])["sources"]
    assert (source["provider"], source["download_url"]) == ("url", url)


def test_a_plain_url_pulled_again_into_a_library_is_said_to_be_there_already(tmp_path: Path, capsys,
                                                                             monkeypatch) -> None:
    data = small_lora(tmp_path / "src" / "x.safetensors", seed=7).read_bytes()
    library = tmp_path / "lib"
    with FakeStorage() as storage:
        url = storage.add("8", Served(data, content_disposition='attachment; filename="plain.safetensors"'))
        first = pull_json([url, "--library", str(library)], capsys, monkeypatch)
        second = pull_json([url, "--library", str(library)], capsys, monkeypatch)
    assert [(code, outcome["status"]) for code, (outcome,), _ in (first, second)] == [
        (0, "pulled"), (0, "already have")]
    assert [p.relative_to(library) for p in library.rglob("*.safetensors")] == [
        Path("models/Lora/plain.safetensors")]


def test_a_file_already_in_the_registry_is_not_downloaded_again(knight, tmp_path: Path, capsys, monkeypatch) -> None:
    fake, version_id, data = knight
    mine = tmp_path / "mine" / "my-knight.safetensors"
    mine.parent.mkdir()
    mine.write_bytes(data)
    assert run(["scan", str(mine.parent)], capsys, monkeypatch)[0] == 0
    code, out, err = run(["pull", f"civitai:{version_id}", "--dest", str(tmp_path / "dl")], capsys, monkeypatch)
    assert code == 0, err
    autov2 = sha256(data)[:10]
    assert out.splitlines() == [f"already have  civitai:{version_id}  {mine}  (lora, sd1; AutoV2 {autov2})",
                                f"{'':13} in the registry already; nothing was downloaded"]
    assert not (tmp_path / "dl").exists()
    assert storage_requests(fake) == [] and not [r for r in fake.requests if "/download/" in r["path"]]
    (source,) = json.loads(run(["show", str(mine), "--json"], capsys, monkeypatch)[1])["sources"]
    assert source["civitai_version_id"] == version_id  # the registry now knows where it can be had again

    library = tmp_path / "lib"  # a library must hold the file: it is copied from the registry's, not downloaded
    code, (outcome,), err = pull_json([f"civitai:{version_id}", "--library", str(library)], capsys, monkeypatch)
    assert code == 0, err
    assert outcome["status"] == "pulled" and outcome["notes"] == [f"copied from {mine}, not downloaded"]
    assert (library / "models" / "Lora" / "my-knight.safetensors").read_bytes() == data
    assert (library / "models" / "Lora" / "my-knight.civitai.info").is_file()
    assert storage_requests(fake) == []


def test_a_different_file_at_the_name_stays_and_ours_lands_beside_it(knight, tmp_path: Path, capsys,
                                                                     monkeypatch) -> None:
    _, version_id, data = knight
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "knight.safetensors").write_bytes(b"the user's own file")
    code, out, err = run(["pull", f"civitai:{version_id}", "--dest", str(dest)], capsys, monkeypatch)
    assert code == 0, err
    beside = dest / f"knight.{sha256(data)[:10]}.safetensors"
    assert beside.read_bytes() == data and (dest / "knight.safetensors").read_bytes() == b"the user's own file"
    assert f"knight.safetensors is a different file: this one is {beside.name}" in out


def test_two_pulls_at_once_make_one_good_file(knight, tmp_path: Path, capsys) -> None:
    fake, version_id, data = knight
    fake.served(version_id).piece_delay_s = 0.2
    fake.served(version_id).data = data = data + bytes(200 << 10)  # several pieces, so the two overlap
    fake.versions[version_id].files[0] = ("knight.safetensors", data)
    dest = tmp_path / "dl"
    codes: list[Any] = []

    def one() -> None:
        try:
            cli.main(["pull", f"civitai:{version_id}", "--dest", str(dest)], standalone_mode=False)
            codes.append(0)
        except SystemExit as exc:
            codes.append(exc.code)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [0, 0]
    assert sorted(p.name for p in dest.iterdir()) == ["knight.safetensors"]
    assert (dest / "knight.safetensors").read_bytes() == data
    out, err = capsys.readouterr()
    assert "knight.safetensors is already being downloaded; waiting for it" in err  # they did overlap
    assert "already have" in out


def test_hf_ref_is_checked_against_the_lfs_sha256_and_a_corrupted_answer_is_refused(
        fake_hub: FakeHub, tmp_path: Path, capsys, monkeypatch) -> None:
    data = small_lora(tmp_path / "src" / "w.safetensors", seed=4).read_bytes()
    repo = fake_hub.add_repo("bob/style", {"loras/style.safetensors": data},
                             tags=["lora", "base_model:runwayml/stable-diffusion-v1-5"])
    fake_hub.blobs[sha256(data)] = bad = data[:-1] + bytes([data[-1] ^ 1])
    dest = tmp_path / "dl"
    ref = "hf:bob/style/loras/style.safetensors"
    code, out, _ = run(["pull", ref, "--dest", str(dest)], capsys, monkeypatch)
    assert code == 1
    assert out.strip() == (f"failed        {ref}: style.safetensors is not the file expected: its SHA256 is "
                           f"{sha256(bad)} but the Hub says {sha256(data)}; nothing was saved")
    assert not dest.exists() or list(dest.iterdir()) == []

    fake_hub.blobs[sha256(data)] = data  # the Hub is fixed: the bad bytes were not kept in the cache
    code, (outcome,), err = pull_json([ref, "--dest", str(dest)], capsys, monkeypatch)
    assert code == 0, err
    assert (dest / "style.safetensors").read_bytes() == data
    assert outcome["source_ref"] == f"{ref}@{repo.commit}" and outcome["kind"] == "lora"
    storage = [r for r in fake_hub.requests if r["server"] == "storage"]
    assert len(storage) == 2 and all(r["authorization"] is None for r in storage)


@pytest.mark.parametrize(("layout", "folder"), [("a1111", "models/Lora"), ("comfyui", "models/loras")])
def test_library_places_a_lora_with_sidecars_and_shows_a_base_disagreement(
        fake_civitai: FakeCivitai, tmp_path: Path, layout: str, folder: str, capsys, monkeypatch) -> None:
    lora = small_lora(tmp_path / "src" / "knight.safetensors", seed=1)
    version = fake_civitai.add_model("Tiny Knight", [lora], base_model="SDXL 1.0").versions[0]
    library = tmp_path / "lib"
    code, out, err = run(["pull", f"civitai:{version.id}", "--library", str(library), "--layout", layout],
                         capsys, monkeypatch)
    assert code == 0, err
    placed = library / folder / "knight.safetensors"
    assert placed.read_bytes() == lora.read_bytes()
    info = json.loads((library / folder / "knight.civitai.info").read_text())
    assert (info["id"], info["baseModel"]) == (version.id, "SDXL 1.0")
    assert (library / folder / "knight.preview.png").read_bytes() == tiny_png()
    assert "the source says base SDXL 1.0 but the file is sd1" in out
    assert sorted(str(p.relative_to(library)) for p in library.rglob("*") if p.is_file()) == [
        f"{folder}/knight.civitai.info", f"{folder}/knight.preview.png", f"{folder}/knight.safetensors"]


class Hostile:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pulled_pickle_that_wants_to_run_code_is_never_loaded_and_recorded_unsafe(
        fake_civitai: FakeCivitai, tmp_path: Path, capsys, monkeypatch) -> None:
    marker = tmp_path / "PWNED"
    hostile = tmp_path / "src" / "style.pt"
    hostile.parent.mkdir()
    hostile.write_bytes(pickle.dumps(Hostile(marker)))
    version = fake_civitai.add_model("Style", [hostile], type="TextualInversion").versions[0]
    library = tmp_path / "lib"
    code, (outcome,), err = pull_json([f"civitai:{version.id}", "--library", str(library)], capsys, monkeypatch)
    assert code == 0, err
    assert outcome["unsafe"] is True and outcome["path"] == str(library / "embeddings" / "style.pt")
    assert any(n.startswith("unsafe: ") and "unsafe pickle" in n and "posix.system" in n for n in outcome["notes"]), \
        outcome["notes"]
    assert not marker.exists()
    (row,) = json.loads(run(["list", "--json"], capsys, monkeypatch)[1])
    assert (row["status"], row["kind"]) == ("unsafe", "unknown")


def test_lock_then_pull_lock_rebuilds_a_library_checking_every_hash(
        knight, fake_hub: FakeHub, tmp_path: Path, capsys, monkeypatch) -> None:
    fake, version_id, data = knight
    hub_data = small_lora(tmp_path / "src" / "w.safetensors", seed=5).read_bytes()
    fake_hub.add_repo("bob/style", {"style.safetensors": hub_data}, tags=["lora"])
    first, lock = tmp_path / "lib1", tmp_path / "zoo.lock.json"
    code, _, err = run(["pull", f"civitai:{version_id}", "hf:bob/style/style.safetensors", "--library", str(first)],
                       capsys, monkeypatch)
    assert code == 0, err
    assert run(["lock", "-o", str(lock)], capsys, monkeypatch)[0] == 0

    monkeypatch.setenv("ADAPTERZOO_HOME", str(tmp_path / "other-machine"))  # a fresh registry
    second = tmp_path / "lib2"
    code, outcomes, err = pull_json(["--lock", str(lock), "--library", str(second)], capsys, monkeypatch)
    assert code == 0, err
    assert [o["status"] for o in outcomes] == ["pulled", "pulled"]
    for name, expected in (("knight.safetensors", data), ("style.safetensors", hub_data)):
        assert (second / "models" / "Lora" / name).read_bytes() == expected
    assert (second / "models" / "Lora" / "knight.civitai.info").is_file()

    asked = len(fake.requests) + len(fake_hub.requests)
    code, outcomes, err = pull_json(["--lock", str(lock), "--library", str(second)], capsys, monkeypatch)
    assert code == 0, err
    assert [o["status"] for o in outcomes] == ["already have", "already have"]
    assert len(fake.requests) + len(fake_hub.requests) == asked  # found in place: not even looked up

    (second / "models" / "Lora" / "knight.safetensors").write_bytes(data[:-1] + b"\x00")  # damaged in place
    body = json.loads(lock.read_text())
    body["files"][1]["sha256"] = "0" * 64  # and the Hub now offers another file than the lock names
    lock.write_text(json.dumps(body))
    code, outcomes, _ = pull_json(["--lock", str(lock), "--library", str(second)], capsys, monkeypatch)
    assert code == 1
    assert outcomes[0]["status"] == "pulled"  # the damaged file is kept; the good one lands beside it
    assert Path(outcomes[0]["path"]).read_bytes() == data
    assert outcomes[1]["status"] == "failed" and "now offers a different file" in outcomes[1]["error"]


@pytest.mark.parametrize("args", [["x", "--dest", "a", "--library", "b"], ["x", "--layout", "comfyui"], []])
def test_usage_errors_exit_2(args: list[str], capsys, monkeypatch) -> None:
    assert run(["pull", *args], capsys, monkeypatch)[0] == 2


def test_a_file_that_is_not_a_lock_file_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    bad = tmp_path / "zoo.lock.json"
    bad.write_text(json.dumps({"version": 1, "files": [{"ref": "civitai:1"}]}))
    code, out, err = run(["pull", "--lock", str(bad), "--library", str(tmp_path / "lib")], capsys, monkeypatch)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {bad} is not an adapterzoo lock file") and err.count("\n") == 1
    assert not (tmp_path / "lib").exists()
