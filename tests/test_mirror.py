"""A team mirror (issue 18 §2): `lock --mirror DIR` fills a folder laid out by SHA-256 from the registry, and
`pull --lock FILE --mirror PATH|URL` on a render node takes files from it (a folder, or the same folder behind
Python's own http.server) before Civitai or the Hub, checked by SHA-256; a miss or wrong bytes fall back."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import run
from factory import small_lora
from fake_civitai import FakeCivitai
from fake_hub import FakeHub


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(mirror: Path, data: bytes) -> Path:
    digest = sha256(data)
    return mirror / "sha256" / digest[:2] / digest


def pull_json(args: list[str], capsys, monkeypatch) -> tuple[int, list[dict[str, Any]], str]:
    code, out, err = run(["pull", *args, "--json"], capsys, monkeypatch)
    return code, json.loads(out), err


def lock_entries(path: Path) -> list[tuple[str, str, int]]:
    return sorted((f["ref"], f["sha256"], f["size"]) for f in json.loads(path.read_text())["files"])


def asked(fake: FakeCivitai, hub: FakeHub) -> int:
    return len(fake.requests) + len(fake.storage.seen) + len(hub.requests)


@pytest.fixture
def studio(fake_civitai: FakeCivitai, fake_hub: FakeHub, tmp_path: Path, capsys, monkeypatch) -> dict[str, Any]:
    """The studio's machine: a Civitai LoRA and a Hub LoRA pulled into an A1111 library, locked, and the lock's
    files put into a mirror folder. Then ADAPTERZOO_HOME moves: the test goes on as a fresh render node."""
    knight = small_lora(tmp_path / "src" / "knight.safetensors", seed=1).read_bytes()
    style = small_lora(tmp_path / "src" / "style.safetensors", seed=2).read_bytes()
    version = fake_civitai.add_model("Tiny Knight", [tmp_path / "src" / "knight.safetensors"]).versions[0].id
    fake_hub.add_repo("bob/style", {"style.safetensors": style}, tags=["lora"])
    lock, mirror = tmp_path / "zoo.lock.json", tmp_path / "nas" / "mirror"
    mirror.parent.mkdir()
    code, _, err = run(["pull", f"civitai:{version}", "hf:bob/style/style.safetensors", "--library",
                        str(tmp_path / "studio")], capsys, monkeypatch)
    assert code == 0, err
    code, out, err = run(["lock", "-o", str(lock), "--mirror", str(mirror)], capsys, monkeypatch)
    assert code == 0, err
    assert out.splitlines() == [f"wrote    {lock} (2 files)", f"mirror   {mirror}: 2 added (2 hard-linked), 0 already there"]
    monkeypatch.setenv("ADAPTERZOO_HOME", str(tmp_path / "render-node"))
    fake_civitai.requests.clear()
    fake_civitai.storage.seen.clear()
    fake_hub.requests.clear()
    return {"fake": fake_civitai, "hub": fake_hub, "lock": lock, "mirror": mirror, "knight": knight,
            "style": style, "version": version, "studio": tmp_path / "studio" / "models" / "Lora"}


@pytest.fixture
def http_mirror(studio: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """The mirror folder served by Python's plain http.server (no Range support): its URL and the paths asked."""
    seen: list[str] = []

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            seen.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(studio["mirror"])))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_lock_mirror_lays_files_out_by_sha256_and_a_render_node_pulls_from_it_without_asking_a_source(
        studio: dict[str, Any], tmp_path: Path, capsys, monkeypatch) -> None:
    mirror = studio["mirror"]
    for name in ("knight", "style"):
        stored = blob(mirror, studio[name])
        assert stored.read_bytes() == studio[name]
        assert os.path.samefile(stored, studio["studio"] / f"{name}.safetensors")  # a hard link, not a copy
    assert sorted(str(p.relative_to(mirror)) for p in mirror.rglob("*") if p.is_file()) == sorted(
        f"sha256/{sha256(studio[n])[:2]}/{sha256(studio[n])}" for n in ("knight", "style"))

    node = tmp_path / "node"
    code, outcomes, err = pull_json(["--lock", str(studio["lock"]), "--mirror", str(mirror), "--library", str(node)],
                                    capsys, monkeypatch)
    assert code == 0, err
    assert [(o["status"], o["notes"]) for o in outcomes] == [("pulled", [f"from the mirror {mirror}"])] * 2
    for name in ("knight", "style"):
        assert (node / "models" / "Lora" / f"{name}.safetensors").read_bytes() == studio[name]
    assert asked(studio["fake"], studio["hub"]) == 0  # neither Civitai nor the Hub was asked anything
    code, out, _ = run(["show", str(node / "models" / "Lora" / "knight.safetensors")], capsys, monkeypatch)
    assert f"source         civitai version {studio['version']}\n" in out  # what the REF says; enrich adds the rest

    relock = tmp_path / "node.lock.json"
    assert run(["lock", "-o", str(relock)], capsys, monkeypatch)[0] == 0  # the render node names them the same way
    assert lock_entries(relock) == lock_entries(studio["lock"])

    monkeypatch.setenv("ADAPTERZOO_HOME", str(tmp_path / "studio-again"))  # a registry that knows nothing
    run(["scan", str(studio["studio"])], capsys, monkeypatch)
    run(["pull", f"civitai:{studio['version']}", "--dest", str(tmp_path / "dl")], capsys, monkeypatch)
    code, out, _ = run(["lock", "-o", str(tmp_path / "again.lock.json"), "--mirror", str(mirror)], capsys, monkeypatch)
    assert code == 0 and out.splitlines()[-1] == f"mirror   {mirror}: 0 added (0 hard-linked), 1 already there"


def test_a_mirror_missing_a_file_or_holding_other_bytes_falls_back_to_the_source(
        studio: dict[str, Any], tmp_path: Path, capsys, monkeypatch) -> None:
    mirror = studio["mirror"]
    blob(mirror, studio["knight"]).unlink()
    wrong = blob(mirror, studio["style"])
    wrong.unlink()  # a hard link to the studio's file: replace it, never write through it
    wrong.write_bytes(studio["style"][:-1] + b"\x00")  # same size, other bytes
    node = tmp_path / "node"
    code, outcomes, err = pull_json(["--lock", str(studio["lock"]), "--mirror", str(mirror), "--library", str(node)],
                                    capsys, monkeypatch)
    assert code == 0, err
    assert [o["status"] for o in outcomes] == ["pulled", "pulled"]
    assert outcomes[0]["notes"][0] == f"not from the mirror: the mirror has no such file: {blob(mirror, studio['knight'])}"
    assert outcomes[1]["notes"][0] == (
        f"not from the mirror: {wrong.name} is not the file expected: its SHA256 is {sha256(wrong.read_bytes())} "
        f"but its name in the mirror says {sha256(studio['style'])}; nothing was saved")
    for name in ("knight", "style"):
        assert (node / "models" / "Lora" / f"{name}.safetensors").read_bytes() == studio[name]
    assert sorted(p.name for p in (node / "models" / "Lora").iterdir() if p.suffix != ".info") == [
        "knight.preview.png", "knight.safetensors", "style.safetensors"]  # nothing of the refused copy is left
    assert any(r["path"].startswith("/api/download/") for r in studio["fake"].requests)


def test_an_http_mirror_is_taken_first_and_a_wrong_or_missing_file_there_falls_back(
        studio: dict[str, Any], http_mirror: tuple[str, list[str]], tmp_path: Path, capsys, monkeypatch) -> None:
    url, seen = http_mirror
    node = tmp_path / "node"
    with_login = url.replace("http://", "http://team:s3cret@")  # a password in the URL is never printed
    code, out, err = run(["pull", "--lock", str(studio["lock"]), "--mirror", with_login, "--library", str(node),
                          "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert [o["notes"] for o in json.loads(out)] == [[f"from the mirror {url.rstrip('/')}"]] * 2
    assert "s3cret" not in out + err
    assert sorted(seen) == sorted(f"/sha256/{sha256(studio[n])[:2]}/{sha256(studio[n])}" for n in ("knight", "style"))
    assert (node / "models" / "Lora" / "style.safetensors").read_bytes() == studio["style"]
    assert asked(studio["fake"], studio["hub"]) == 0

    monkeypatch.setenv("ADAPTERZOO_HOME", str(tmp_path / "second-node"))
    wrong = blob(studio["mirror"], studio["knight"])
    wrong.unlink()
    wrong.write_bytes(b"\x00" * len(studio["knight"]))
    blob(studio["mirror"], studio["style"]).unlink()
    second = tmp_path / "second"
    code, outcomes, err = pull_json(["--lock", str(studio["lock"]), "--mirror", url, "--library", str(second)],
                                    capsys, monkeypatch)
    assert code == 0, err
    knight_note, style_note = outcomes[0]["notes"][0], outcomes[1]["notes"][0]
    assert knight_note.startswith(f"not from the mirror: knight.safetensors from {url}sha256/") and (
        f"is not the file expected: its SHA256 is {sha256(wrong.read_bytes())} but the mirror says "
        f"{sha256(studio['knight'])}; nothing was saved") in knight_note
    assert style_note.startswith("not from the mirror: the mirror has no such file (404")
    for name in ("knight", "style"):
        assert (second / "models" / "Lora" / f"{name}.safetensors").read_bytes() == studio[name]
    assert not list(second.rglob("*.part"))


def test_a_mirror_miss_without_network_fails_in_one_line_with_both_reasons(
        studio: dict[str, Any], tmp_path: Path, capsys, monkeypatch) -> None:
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("CIVITAI_BASE_URL", f"http://127.0.0.1:{port}")
    code, outcomes, _ = pull_json(["--lock", str(studio["lock"]), "--mirror", str(empty), "--library",
                                   str(tmp_path / "node")], capsys, monkeypatch)
    assert code == 1
    assert outcomes[0]["error"] == (
        f"no network: could not reach 127.0.0.1:{port} (connection refused) (not from the mirror: the mirror has no "
        f"such file: {blob(empty, studio['knight'])})")


def test_mirror_usage_and_bad_folders_are_one_line(studio: dict[str, Any], tmp_path: Path, capsys,
                                                   monkeypatch) -> None:
    assert run(["pull", "civitai:1", "--mirror", str(studio["mirror"])], capsys, monkeypatch)[0] == 2
    code, out, err = run(["pull", "--lock", str(studio["lock"]), "--mirror", str(tmp_path / "nope")], capsys,
                         monkeypatch)
    assert (code, out) == (1, "")
    assert err == f"error: mirror {tmp_path / 'nope'} is not a folder (give a folder or an http(s) URL)\n"

    lock = tmp_path / "new.lock.json"
    code, _, err = run(["lock", "-o", str(lock), "--mirror", str(tmp_path / "no" / "such" / "mirror")], capsys,
                       monkeypatch)
    assert code == 1 and err == (f"error: cannot make the mirror {tmp_path / 'no' / 'such' / 'mirror'}: "
                                 f"{tmp_path / 'no' / 'such'} is not a folder\n")
    assert not lock.exists()


def test_lock_mirror_names_each_file_it_could_not_put_there(studio: dict[str, Any], tmp_path: Path, capsys,
                                                            monkeypatch) -> None:
    node = tmp_path / "node"
    run(["pull", "--lock", str(studio["lock"]), "--mirror", str(studio["mirror"]), "--library", str(node)], capsys,
        monkeypatch)
    (node / "models" / "Lora" / "knight.safetensors").write_bytes(b"edited since the scan")
    fresh = tmp_path / "fresh-mirror"
    code, out, _ = run(["lock", "-o", str(tmp_path / "node.lock.json"), "--mirror", str(fresh)], capsys, monkeypatch)
    assert code == 1
    assert out.splitlines()[1:] == [
        "no copy  knight.safetensors: no unchanged copy on disk in the registry",
        f"mirror   {fresh}: 1 added (1 hard-linked), 0 already there"]
    assert blob(fresh, studio["style"]).read_bytes() == studio["style"]
