"""A file that moves keeps its id, sources and verifications; a rescan reads nothing unchanged and follows a
rename by inode without reading it (issue 14 §2). Two hosts scan into one registry; a shared root is known at
its path on each host (issue 18 §2)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from library_layout import Cli, locations, lora, side_by_side
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_verify import kohya_file

from adapterzoo import tiny_models
from adapterzoo.formats import probe as probe_module
from adapterzoo.zoo import hashing, scan
from adapterzoo.zoo.db import open_registry
from adapterzoo.zoo.models import FileEntry

FAST = ["--steps", "1", "--size", "64x64", "--multiplier", "0", "--multiplier", "1"]


@pytest.fixture
def library(tmp_path: Path) -> dict[str, Path]:
    return side_by_side(tmp_path / "sd")


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every file probed or hashed from now on, by name."""
    seen: list[str] = []
    real_probe, real_hash = probe_module.probe, hashing.hash_file

    def probe(path, *args, **kwargs):
        seen.append(Path(path).name)
        return real_probe(path, *args, **kwargs)

    def hash_file(path, *args, **kwargs):
        seen.append(Path(path).name)
        return real_hash(path, *args, **kwargs)

    monkeypatch.setattr(probe_module, "probe", probe)
    monkeypatch.setattr(scan, "hash_file", hash_file)
    return seen


def by_name(cli: Cli, host: str = "a") -> dict[str, dict]:
    return {e["name"]: e for e in cli.json("list", host=host)}


def test_a_rename_and_a_move_are_followed_by_inode_without_reading_the_file(library, cli, reads, fake_civitai):
    fake_civitai.add_model("Tiny Style", [library["style"]], trained_words=["inkwash"])
    cli.json("scan", library["root"])
    assert {o["name"]: o["status"] for o in cli.json("enrich", "--all")}["style.safetensors"] == "found"
    before = by_name(cli)["style.safetensors"]
    reads.clear()

    renamed = library["style"].with_name("ink-style.safetensors")
    library["style"].rename(renamed)
    moved = library["root"] / "elsewhere" / "castle.safetensors"
    moved.parent.mkdir()
    library["comfy_only"].rename(moved)
    report = cli.json("scan", library["root"])
    assert reads == []  # nothing was read: size, mtime and inode say it all
    assert (report["moved"], report["indexed"], report["missing"], report["unchanged"]) == (2, 0, 0, 4)
    assert {(Path(m["from"]).name, Path(m["to"]).name, m["action"]) for m in report["moves"]} == {
        ("style.safetensors", "ink-style.safetensors", "rename"), ("castle.safetensors", "castle.safetensors", "move")}
    shown = cli.json("show", renamed)
    assert shown["id"] == before["id"] and shown["sources"][0]["model_name"] == "Tiny Style"
    assert locations(shown) == {str(renamed): False, str(library["style_copy"]): False}  # no trace of the old name
    assert [(e["action"], e["path"], e["new_path"]) for e in shown["history"]] == [
        ("rename", str(library["style"]), str(renamed))]
    code, out, _ = cli("show", "ink-style.safetensors")  # by file name, from anywhere
    assert code == 0 and "history        " in out and f"rename  {library['style']} -> {renamed}" in out


def test_a_copy_to_another_disk_then_a_delete_is_a_move_found_by_content(library, cli, reads):
    cli.json("scan", library["root"])
    style_id = by_name(cli)["style.safetensors"]["id"]
    elsewhere = library["root"] / "other-disk" / "style.safetensors"
    elsewhere.parent.mkdir()
    shutil.copy2(library["style"], elsewhere)  # a new inode: what crossing file systems gives
    library["style"].unlink()
    reads.clear()
    report = cli.json("scan", library["root"])
    assert sorted(reads) == ["style.safetensors", "style.safetensors"]  # probed and hashed, once
    assert (report["moved"], report["indexed"], report["missing"]) == (1, 1, 0)
    shown = cli.json("show", style_id)
    assert locations(shown) == {str(elsewhere): False, str(library["style_copy"]): False}
    assert shown["history"][0]["action"] == "move"


def test_hard_links_are_known_without_reading_and_new_bytes_are_a_new_file(library, cli, reads):
    cli.json("scan", library["root"])
    twin = cli.json("show", library["twin_name"])
    link = library["comfyui"] / "models" / "loras" / "castle-link.safetensors"
    os.link(library["comfy_only"], link)
    reads.clear()
    report = cli.json("scan", library["root"])
    assert reads == [] and (report["linked"], report["indexed"]) == (1, 0)
    assert locations(cli.json("show", link)) == {str(library["comfy_only"]): False, str(link): False}

    lora(library["twin_name"], seed=5)  # new bytes where a known file was
    report = cli.json("scan", library["root"])
    assert reads == ["castle.safetensors", "castle.safetensors"] and report["indexed"] == 1
    assert cli.json("show", library["twin_name"])["id"] != twin["id"]  # a file is its content
    old = cli.json("show", twin["id"])  # the old content is remembered, with what happened to it
    assert old["locations"] == [] and old["sha256"] == twin["sha256"]
    assert [(e["action"], e["path"]) for e in old["history"]] == [("replace", str(library["twin_name"]))]


def test_a_scan_marks_only_its_own_hosts_locations_missing(tmp_path, cli, monkeypatch, registry_db):
    """Both hosts record the same path (each has /models on its own disk); host a scans after the file is gone
    on its disk: a's location is missing, b's is not touched."""
    models = tmp_path / "models"
    lora(models / "shared-name.safetensors")
    lora(models / "only-b.safetensors", seed=1)
    cli.json("scan", models, host="b")
    (models / "only-b.safetensors").unlink()
    report = cli.json("scan", models, host="a")
    assert (report["indexed"], report["missing"]) == (1, 0)  # a never had it: nothing of a's is missing
    entries = by_name(cli, host="b")
    assert locations(entries["only-b.safetensors"]) == {str(models / "only-b.safetensors"): False}
    assert locations(entries["shared-name.safetensors"], "a") == {str(models / "shared-name.safetensors"): False}
    assert locations(entries["shared-name.safetensors"], "b") == {str(models / "shared-name.safetensors"): False}
    (models / "shared-name.safetensors").unlink()
    assert cli.json("scan", models, host="a")["missing"] == 1
    entries = by_name(cli, host="b")
    assert locations(entries["shared-name.safetensors"], "a") == {str(models / "shared-name.safetensors"): True}
    assert locations(entries["shared-name.safetensors"], "b") == {str(models / "shared-name.safetensors"): False}
    assert entries["shared-name.safetensors"]["status"] == "ok"  # as b sees it
    assert by_name(cli, host="a")["shared-name.safetensors"]["status"] == "elsewhere"  # gone here, on b still

    def present(host: str) -> list[str | None]:  # FileEntry.path and .missing in SQL: as `host` sees them
        monkeypatch.setenv("ADAPTERZOO_HOST", host)
        with Session(open_registry()) as session:
            return list(session.scalars(select(FileEntry.path).where(FileEntry.missing.is_(False))
                                        .order_by(FileEntry.path)))

    assert present("a") == [] and present("b") == [str(models / "only-b.safetensors"),
                                                    str(models / "shared-name.safetensors")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_models.save_tiny_pipeline("sd1", tmp_path_factory.mktemp("sd1") / "tiny-sd1", seed=1)


def test_two_hosts_one_registry_a_move_on_a_and_a_verdict_that_counts_on_b(tmp_path, cli, checkpoint, monkeypatch,
                                                                           registry_db):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    on_a, on_b = tmp_path / "host-a" / "Lora", tmp_path / "host-b" / "loras"
    on_a.mkdir(parents=True)
    style = kohya_file(pipe, "sd1", on_a / "style.safetensors")
    on_b.mkdir(parents=True)
    shutil.copy2(style, on_b / "style.safetensors")
    lora(on_b / "b-only.safetensors")
    cli.json("scan", on_a, host="a")
    cli.json("scan", on_b, host="b")
    entries = by_name(cli, host="b")
    assert set(entries) == {"style.safetensors", "b-only.safetensors"}
    assert {loc["host"]: loc["path"] for loc in entries["style.safetensors"]["locations"]} == {
        "a": str(on_a / "style.safetensors"), "b": str(on_b / "style.safetensors")}
    assert [e["name"] for e in cli.json("list", "--here", host="a")] == ["style.safetensors"]
    assert {e["path"] for e in cli.json("list", "--host", "b", host="a")} == {
        str(on_b / "style.safetensors"), str(on_b / "b-only.safetensors")}  # paths as b sees them

    code, _, err = cli("verify", on_a / "style.safetensors", "--checkpoint", checkpoint, *FAST, host="a")
    assert code == 0, err
    moved = on_a / "styles" / "ink.safetensors"
    moved.parent.mkdir()
    (on_a / "style.safetensors").rename(moved)
    assert cli.json("scan", on_a, host="a")["moved"] == 1
    on_b_view = by_name(cli, host="b")["style.safetensors"]
    assert on_b_view["verified"] == "pass"  # the verdict belongs to the content
    assert on_b_view["path"] == str(on_b / "style.safetensors")
    assert locations(on_b_view, "b") == {str(on_b / "style.safetensors"): False}  # a's move left b's alone
    assert locations(on_b_view, "a") == {str(moved): False}
    assert [e["name"] for e in cli.json("list", "--verdict", "pass", "--here", host="b")] == ["style.safetensors"]


def test_a_shared_root_is_known_once_at_each_hosts_mount(tmp_path, cli, registry_db):
    """A NAS at /srv/nas on host a and (here, a second folder standing in for the same storage) at another path
    on host b: one location per file, each host sees it under its own mount; either host may mark it missing."""
    nas_a, nas_b = tmp_path / "nas-as-a-sees-it", tmp_path / "nas-as-b-sees-it"
    lora(nas_a / "loras" / "team.safetensors")
    lora(nas_a / "loras" / "old.safetensors", seed=1)
    cli.json("scan", nas_a, host="a")  # scanned before it was declared shared: those locations join the root
    added = cli.json("roots", "add", nas_a, "--shared", "--mount", f"b={nas_b}", host="a")
    assert (added["host"], added["locations"]) == ("*", 2)
    shutil.copytree(nas_a, nas_b, copy_function=shutil.copy2)
    team = by_name(cli, host="b")["team.safetensors"]
    assert [(loc["host"], loc["path"], loc["here"]) for loc in team["locations"]] == [
        ("*", str(nas_b / "loras" / "team.safetensors"), True)]
    assert team["path"] == str(nas_b / "loras" / "team.safetensors")
    (nas_b / "loras" / "old.safetensors").unlink()  # gone from the storage, seen from b
    report = cli.json("scan", host="b")  # the bare scan walks b's mount
    assert (report["missing"], report["indexed"] + report["unchanged"]) == (1, 1)
    assert len(cli.json("show", "team.safetensors", host="a")["locations"]) == 1  # one location, not one per host
    old = by_name(cli, host="a")["old.safetensors"]
    assert locations(old) == {str(nas_a / "loras" / "old.safetensors"): True}
    rows = {r["id"]: r for r in cli.json("roots", "list", host="b")}
    assert rows[added["id"]]["mounts"] == {"a": str(nas_a), "b": str(nas_b)}
