"""search, enrich, lock and REF resolution against the fake Civitai and Hub (tests/fake_civitai.py, fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
from cli_helpers import run
from factory import small_lora
from fake_civitai import TOKEN, FakeCivitai
from fake_hub import FakeHub
from sqlalchemy import create_engine, text

from adapterzoo.errors import AdapterzooError
from adapterzoo.zoo.civitai import CivitaiClient, parse_model_url
from adapterzoo.zoo.db import registry_url
from adapterzoo.zoo.refs import resolve_ref

HIT_KEYS = {"source", "model_id", "version_id", "name", "version_name", "kind", "base", "url", "trained_words",
            "description", "image", "files", "in_registry"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def loras(tmp_path: Path) -> dict[str, Path]:
    """Three small real LoRAs in a scanned-looking folder: two Civitai knows, one it does not."""
    return {name: small_lora(tmp_path / "models" / "Lora" / f"{name}.safetensors", seed=i)
            for i, name in enumerate(("known", "other", "homemade"))}


@pytest.fixture
def civitai_models(fake_civitai: FakeCivitai, loras: dict[str, Path], tmp_path: Path) -> FakeCivitai:
    fake_civitai.add_model("Tiny Knight", [loras["known"]], trained_words=["kn1ght", "armor"], downloads=50)
    model = fake_civitai.add_model("Tiny Castle", [loras["other"]], base_model="SD 1.5", downloads=20)
    fake_civitai.add_version(model, [small_lora(tmp_path / "v2" / "castle_v2.safetensors", seed=7)], "SDXL 1.0",
                             ["castle"])
    fake_civitai.add_model("Tiny Secret", [small_lora(tmp_path / "x" / "secret.safetensors", seed=9)], nsfw=True)
    return fake_civitai


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_rows(table: str) -> list[tuple]:
    """The rows of `table` in the registry the commands use."""
    with create_engine(registry_url()).connect() as connection:
        return [tuple(row) for row in connection.execute(text(f"SELECT * FROM {table}"))]


# -- search ------------------------------------------------------------------------------------


def test_search_civitai_gives_one_row_per_version_and_marks_files_in_the_registry(
        civitai_models: FakeCivitai, loras: dict[str, Path], capsys, monkeypatch) -> None:
    assert run(["scan", str(loras["known"].parent)], capsys, monkeypatch)[0] == 0
    code, out, err = run(["search", "tiny", "--source", "civitai", "--sort", "downloads", "--json"], capsys,
                         monkeypatch)
    assert code == 0, err
    hits = json.loads(out)
    assert all(set(h) == HIT_KEYS for h in hits)
    assert [(h["name"], h["version_name"], h["base"]) for h in hits] == [
        ("Tiny Knight", "v1.0", "sd1"), ("Tiny Castle", "v2.0", "sdxl"), ("Tiny Castle", "v1.0", "sd1")]
    knight = hits[0]
    assert knight["files"] == [{"name": "known.safetensors", "size": loras["known"].stat().st_size,
                                "sha256": sha256(loras["known"]),
                                "download": f"{civitai_models.url}/api/download/models/{knight['version_id']}"}]
    assert (knight["kind"], knight["trained_words"], knight["in_registry"]) == ("lora", ["kn1ght", "armor"], True)
    assert [h["in_registry"] for h in hits[1:]] == [False, True]  # the Castle's v1 file was scanned, v2 not
    assert all(r["query"]["nsfw"] == ["false"] for r in civitai_models.requests)

    code, out, _ = run(["search", "tiny", "--source", "civitai", "--limit", "2", "--nsfw"], capsys, monkeypatch)
    lines = out.splitlines()
    assert lines[0].split() == ["SOURCE", "MODEL", "VERSION", "NAME", "KIND", "BASE", "FILE", "SIZE", "DOWNLOADS",
                                "HAVE"]
    assert len(lines) == 3 and "Tiny Knight" in lines[1] and "known.safetensors" in lines[1]


def test_search_maps_kind_base_and_sort_to_civitai_parameters(civitai_models: FakeCivitai, capsys,
                                                              monkeypatch) -> None:
    code, out, _ = run(["search", "castle", "--source", "civitai", "--kind", "lora", "--base", "sdxl", "--sort",
                        "newest", "--json"], capsys, monkeypatch)
    assert code == 0
    assert [(h["name"], h["base"]) for h in json.loads(out)] == [("Tiny Castle", "sdxl")]
    query = civitai_models.requests[-1]["query"]
    assert query["types"] == ["LORA"] and "SDXL 1.0" in query["baseModels"] and "Pony" in query["baseModels"]
    assert query["sort"] == ["Newest"] and query["query"] == ["castle"]


def test_search_model_listing_follows_next_cursor(fake_civitai: FakeCivitai, tmp_path: Path) -> None:
    for i in range(5):
        fake_civitai.add_model(f"Paged {i}", [small_lora(tmp_path / f"p{i}.safetensors", seed=20 + i)])
    names = [m["name"] for m in CivitaiClient().search_models("paged", page_size=2)]
    assert sorted(names) == [f"Paged {i}" for i in range(5)]
    cursors = [r["query"].get("cursor") for r in fake_civitai.requests]
    assert cursors == [None, ["2"], ["4"]]


def test_search_hub_lists_repos_at_their_commit(fake_hub: FakeHub, tmp_path: Path, capsys, monkeypatch) -> None:
    lora = small_lora(tmp_path / "hub" / "pytorch_lora_weights.safetensors")
    repo = fake_hub.add_repo("alice/tiny-xl-lora", {"pytorch_lora_weights.safetensors": lora, "README.md": b"hi"},
                             tags=["lora", "diffusers", "base_model:adapter:stabilityai/stable-diffusion-xl-base-1.0"])
    fake_hub.add_repo("alice/tiny-checkpoint", {"model.safetensors": b"x" * 50}, tags=["diffusers"])
    code, out, err = run(["search", "tiny", "--source", "hf", "--kind", "lora", "--json"], capsys, monkeypatch)
    assert code == 0, err
    (hit,) = json.loads(out)
    assert set(hit) == HIT_KEYS
    assert (hit["model_id"], hit["version_id"], hit["kind"], hit["base"]) == (repo.id, repo.commit, "lora", "sdxl")
    assert hit["files"] == [{"name": "pytorch_lora_weights.safetensors", "size": lora.stat().st_size,
                             "sha256": sha256(lora), "download": f"{fake_hub.url}/alice/tiny-xl-lora/resolve/"
                             f"{repo.commit}/pytorch_lora_weights.safetensors"}]
    assert hit["in_registry"] is False


def test_search_all_fills_half_the_rows_from_each_source(civitai_models: FakeCivitai, fake_hub: FakeHub,
                                                         capsys, monkeypatch) -> None:
    for i in range(3):
        fake_hub.add_repo(f"carol/tiny-{i}", {"pytorch_lora_weights.safetensors": bytes([i]) * 64}, tags=["lora"])
    code, out, err = run(["search", "tiny", "--limit", "3", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert [h["source"] for h in json.loads(out)] == ["civitai", "civitai", "hf"]


# -- errors a user meets -----------------------------------------------------------------------


def test_429_is_retried_after_retry_after_then_succeeds(civitai_models: FakeCivitai, capsys, monkeypatch) -> None:
    civitai_models.throttle(2, retry_after="0.5")
    start = time.monotonic()
    code, out, err = run(["search", "knight", "--source", "civitai", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert time.monotonic() - start >= 1.0  # two waits of Retry-After
    assert [h["name"] for h in json.loads(out)] == ["Tiny Knight"]
    assert len(civitai_models.requests) == 3 and civitai_models.most_active == 1


def test_a_retry_after_too_long_to_wait_for_is_one_line(civitai_models: FakeCivitai, capsys, monkeypatch) -> None:
    civitai_models.throttle(1, retry_after="3600")
    code, _, err = run(["search", "knight", "--source", "civitai"], capsys, monkeypatch)
    assert code == 1 and err.startswith("error: ") and "busy: 429" in err and err.count("\n") == 1


def test_no_network_is_one_line(monkeypatch, capsys) -> None:
    port = closed_port()
    monkeypatch.setenv("CIVITAI_BASE_URL", f"http://127.0.0.1:{port}")
    code, _, err = run(["search", "anything", "--source", "civitai"], capsys, monkeypatch)
    assert code == 1
    assert err == f"error: no network: could not reach 127.0.0.1:{port} (connection refused)\n"


def test_hub_without_network_is_one_line(fake_hub: FakeHub, monkeypatch) -> None:
    from huggingface_hub import constants

    port = closed_port()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(AdapterzooError, match=f"^no network: could not reach 127.0.0.1:{port} "):
        resolve_ref("hf:bob/style/x.safetensors")


def test_version_needing_a_token_and_unknown_ids(fake_civitai: FakeCivitai, tmp_path: Path) -> None:
    gated = fake_civitai.add_model("Early Access", [small_lora(tmp_path / "e.safetensors")], needs_token=True)
    version_id = gated.versions[0].id
    with pytest.raises(AdapterzooError, match="wants a token.*CIVITAI_API_TOKEN"):
        resolve_ref(f"civitai:{version_id}")
    with pytest.raises(AdapterzooError, match="refused the token"):
        resolve_ref(f"civitai:{version_id}", token="wrong")
    assert resolve_ref(f"civitai:{version_id}", token=TOKEN).source.civitai_version_id == version_id
    assert {r["authorization"] for r in fake_civitai.requests} == {None, "Bearer wrong", f"Bearer {TOKEN}"}
    with pytest.raises(AdapterzooError, match="^Civitai has no model version 999999$"):
        resolve_ref("civitai:999999")
    with pytest.raises(AdapterzooError, match="^Civitai has no model 999999$"):
        resolve_ref("civitai:model/999999")


# -- REF resolution (what pull calls) ----------------------------------------------------------


def test_every_civitai_ref_form_resolves_to_the_primary_file(civitai_models: FakeCivitai, loras: dict[str, Path],
                                                             tmp_path: Path) -> None:
    castle = next(m for m in civitai_models.models.values() if m.name == "Tiny Castle")
    newest, oldest = castle.versions
    by_model = resolve_ref(f"civitai:model/{castle.id}")
    assert (by_model.ref, by_model.file_name) == (f"civitai:{newest.id}", "castle_v2.safetensors")
    assert by_model.sha256 == sha256(tmp_path / "v2" / "castle_v2.safetensors")
    pinned = resolve_ref(f"civitai:{oldest.id}")
    assert (pinned.file_name, pinned.size, pinned.sha256) == (
        "other.safetensors", loras["other"].stat().st_size, sha256(loras["other"]))
    assert pinned.download_url == f"{civitai_models.url}/api/download/models/{oldest.id}"
    record = pinned.source
    assert (record.provider, record.civitai_model_id, record.model_name, record.version_name) == (
        "civitai", castle.id, "Tiny Castle", "v1.0")
    assert (record.kind, record.base, record.base_stated, record.nsfw) == ("lora", "sd1", "SD 1.5", False)
    assert (record.allow_commercial_use, record.allow_derivatives, record.allow_no_credit) == (["Image", "Rent"],
                                                                                             True, True)
    assert record.preview_url.startswith(civitai_models.url + "/images/")
    assert pinned.info["id"] == oldest.id and pinned.info["files"][0]["name"] == "other.safetensors"
    for url in (f"https://civitai.com/models/{castle.id}/tiny-castle?modelVersionId={oldest.id}",
                f"{civitai_models.url}/models/{castle.id}?modelVersionId={oldest.id}"):
        assert resolve_ref(url).ref == f"civitai:{oldest.id}"
    assert resolve_ref(f"https://civitai.com/models/{castle.id}").ref == f"civitai:{newest.id}"


def test_model_page_urls_parse_to_ids() -> None:
    assert parse_model_url("https://civitai.com/models/123/some-slug?modelVersionId=456") == (123, 456)
    assert parse_model_url("https://civitai.com/models/123") == (123, None)
    assert parse_model_url("https://civitai.com/api/download/models/456?type=Model") == (None, 456)
    with pytest.raises(AdapterzooError, match="not a Civitai model page"):
        parse_model_url("https://civitai.com/user/someone")


def test_hf_ref_resolves_to_the_commit_with_size_and_lfs_sha256(fake_hub: FakeHub, tmp_path: Path) -> None:
    lora = small_lora(tmp_path / "hub" / "w.safetensors")
    repo = fake_hub.add_repo("bob/style", {"loras/style.safetensors": lora},
                             tags=["lora", "base_model:runwayml/stable-diffusion-v1-5"])
    for ref in ("hf:bob/style/loras/style.safetensors", f"hf:bob/style/loras/style.safetensors@{repo.commit}",
                "hf:bob/style/loras/style.safetensors@main"):
        remote = resolve_ref(ref)
        assert remote.ref == f"hf:bob/style/loras/style.safetensors@{repo.commit}"
        assert (remote.file_name, remote.size, remote.sha256) == ("style.safetensors", lora.stat().st_size,
                                                                  sha256(lora))
        assert (remote.source.hf_repo, remote.source.hf_revision, remote.source.base) == ("bob/style", repo.commit,
                                                                                          "sd1")
    with pytest.raises(AdapterzooError, match="no file loras/nope.safetensors"):
        resolve_ref("hf:bob/style/loras/nope.safetensors")
    with pytest.raises(AdapterzooError, match="no repo bob/missing"):
        resolve_ref("hf:bob/missing/x.safetensors")
    with pytest.raises(AdapterzooError, match="no such revision"):
        resolve_ref("hf:bob/style/loras/style.safetensors@0123456789012345678901234567890123456789")
    with pytest.raises(AdapterzooError, match="not a Hub reference"):
        resolve_ref("hf:bob/style")


def test_plain_urls_and_nonsense() -> None:
    remote = resolve_ref("https://example.org/files/x.safetensors")
    assert (remote.source.provider, remote.download_url, remote.file_name, remote.sha256) == (
        "url", "https://example.org/files/x.safetensors", None, None)
    with pytest.raises(AdapterzooError, match="not a reference"):
        resolve_ref("x.safetensors")


# -- enrich and lock ---------------------------------------------------------------------------


def test_enrich_records_sources_and_remembers_unknown_files(
        civitai_models: FakeCivitai, loras: dict[str, Path], registry_home: Path, registry_db: str, capsys,
        monkeypatch) -> None:
    folder = loras["known"].parent
    assert run(["scan", str(folder)], capsys, monkeypatch)[0] == 0
    before = sorted(p.name for p in folder.iterdir())
    code, out, err = run(["enrich", "--all", "--json"], capsys, monkeypatch)
    assert code == 0, err
    outcomes = {o["name"]: o for o in json.loads(out)}
    assert {n: o["status"] for n, o in outcomes.items()} == {
        "known.safetensors": "found", "other.safetensors": "found", "homemade.safetensors": "unknown"}
    asked = [r for r in civitai_models.requests if "by-hash" in r["path"]]
    assert [r["method"] for r in asked] == ["POST"]  # three hashes, one request
    knight = outcomes["known.safetensors"]["source"]
    assert (knight["model_name"], knight["version_name"], knight["trained_words"], knight["base_stated"]) == (
        "Tiny Knight", "v1.0", ["kn1ght", "armor"], "SD 1.5")
    preview = Path(knight["preview_path"])
    assert preview.parent == registry_home / "previews" and preview.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written beside the user's files

    code, out, _ = run(["list", "--query", "KN1GHT", "--json"], capsys, monkeypatch)
    assert [e["name"] for e in json.loads(out)] == ["known.safetensors"]
    code, out, _ = run(["list", "--query", "tiny castle", "--json"], capsys, monkeypatch)
    assert [e["name"] for e in json.loads(out)] == ["other.safetensors"]
    code, out, _ = run(["show", str(loras["known"])], capsys, monkeypatch)
    assert "Tiny Knight / v1.0; base SD 1.5; words kn1ght, armor" in out

    civitai_models.requests.clear()
    code, out, _ = run(["enrich", "--all"], capsys, monkeypatch)
    assert out.splitlines()[-1] == "0 found, 0 unknown, 1 skipped" and civitai_models.requests == []
    code, out, _ = run(["enrich", str(loras["homemade"])], capsys, monkeypatch)
    assert "skipped" in out and "--retry-missing" in out and civitai_models.requests == []

    civitai_models.add_model("Homemade After All", [loras["homemade"]], trained_words=["hm"])
    code, out, _ = run(["enrich", "--all", "--retry-missing", "--json"], capsys, monkeypatch)
    assert [(o["name"], o["status"]) for o in json.loads(out)] == [("homemade.safetensors", "found")]
    assert [r["method"] for r in civitai_models.requests if "by-hash" in r["path"]] == ["GET"]  # one hash: GET
    assert registry_rows("unknown_files") == []


def test_enrich_writes_sidecars_only_when_asked_and_a_rescan_reads_them(
        civitai_models: FakeCivitai, loras: dict[str, Path], capsys, monkeypatch) -> None:
    folder = loras["known"].parent
    run(["scan", str(folder)], capsys, monkeypatch)
    monkeypatch.setenv("CIVITAI_API_TOKEN", TOKEN)
    code, out, err = run(["enrich", str(loras["known"]), "--write-sidecars"], capsys, monkeypatch)
    assert code == 0, err
    sent = {r["path"].split("/")[1]: r["authorization"] for r in civitai_models.requests}
    assert sent == {"api": f"Bearer {TOKEN}", "images": None}  # the token goes to the API only
    info = folder / "known.civitai.info"
    assert f"wrote    {info}" in out and (folder / "known.preview.png").read_bytes().startswith(b"\x89PNG")
    version = json.loads(info.read_text())
    assert version["files"][0]["hashes"]["SHA256"].lower() == sha256(loras["known"])
    info.write_text("{}")  # the user's own edit: a second run keeps it
    run(["enrich", str(loras["known"]), "--write-sidecars"], capsys, monkeypatch)
    assert info.read_text() == "{}"
    info.write_text(json.dumps(version))
    run(["scan", str(folder)], capsys, monkeypatch)
    code, out, _ = run(["show", str(loras["known"]), "--json"], capsys, monkeypatch)
    shown = json.loads(out)
    assert {"kn1ght", "armor"} <= set(shown["trigger_words"])
    assert shown["preview_path"] == str(folder / "known.preview.png")


def test_enrich_without_network_changes_nothing(loras: dict[str, Path], registry_home: Path, capsys,
                                                monkeypatch) -> None:
    run(["scan", str(loras["known"].parent)], capsys, monkeypatch)
    monkeypatch.setenv("CIVITAI_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    code, out, err = run(["enrich", "--all"], capsys, monkeypatch)
    assert code == 1 and err.startswith("error: no network: could not reach 127.0.0.1:") and err.count("\n") == 1
    assert registry_rows("sources") == [] and registry_rows("unknown_files") == []
    assert run(["enrich"], capsys, monkeypatch)[0] == 2  # neither files nor --all: a usage error


def test_enrich_posts_at_most_100_hashes_per_request(fake_civitai: FakeCivitai) -> None:
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(150)]
    assert CivitaiClient().versions_by_sha256(digests) == []
    posts = [r for r in fake_civitai.requests if r["method"] == "POST"]
    assert len(posts) == 2


def test_lock_lists_sourced_files_with_refs_that_resolve_to_the_same_bytes(
        civitai_models: FakeCivitai, loras: dict[str, Path], tmp_path: Path, registry_db: str, capsys,
        monkeypatch) -> None:
    run(["scan", str(loras["known"].parent)], capsys, monkeypatch)
    run(["enrich", "--all"], capsys, monkeypatch)
    dest = tmp_path / "zoo.lock.json"
    code, out, err = run(["lock", "-o", str(dest)], capsys, monkeypatch)
    assert code == 0, err
    assert out.strip() == f"wrote    {dest} (2 files)"
    body = json.loads(dest.read_text())
    assert body["version"] == 1
    assert [(f["file_name"], f["kind"], f["base"], f["size"], f["sha256"]) for f in body["files"]] == [
        (p.name, "lora", "sd1", p.stat().st_size, sha256(p)) for p in (loras["known"], loras["other"])]
    for entry in body["files"]:
        remote = resolve_ref(entry["ref"])
        assert (remote.sha256, remote.size, remote.file_name) == (entry["sha256"], entry["size"], entry["file_name"])
    code, _, err = run(["lock", "-o", str(dest)], capsys, monkeypatch)
    assert code == 1 and "--force" in err


@pytest.mark.parametrize("where", ["refused", "unresolvable"])
def test_offline_failures_are_final_at_once(where: str, registry_home: Path, tmp_path: Path, capsys,
                                            monkeypatch) -> None:
    """Issue 14: a host that does not resolve or refuses the connection is not retried (it took 18-24 s)."""
    from huggingface_hub import constants

    host = f"127.0.0.1:{closed_port()}" if where == "refused" else "nonexistent.invalid"
    monkeypatch.setattr(constants, "ENDPOINT", f"http://{host}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for args in (["search", "cat", "--source", "hf"], ["pull", f"http://{host}/x.safetensors", "--dest",
                                                          str(tmp_path)]):
        began = time.monotonic()
        code, out, err = run(args, capsys, monkeypatch)
        assert time.monotonic() - began < 3, args
        assert code == 1 and "Traceback" not in err and "no network: could not" in out + err, (out, err)
        assert len((out + err).strip().splitlines()) == 1
