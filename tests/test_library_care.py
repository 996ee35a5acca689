"""Duplicates, dedupe, disk use, list columns, show, rm, prune and organize on a library laid out like A1111
and ComfyUI side by side, the same LoRA in both (issue 14 §2, §3, §5), through the command line with --json."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from library_layout import Cli, locations, lora, same_inode, side_by_side

from adapterzoo.zoo import organize as organize_module
from adapterzoo.zoo.db import open_registry
from adapterzoo.zoo.verifications import record_verification

REAL = Path(__file__).parent / "fixtures" / "real"


@pytest.fixture
def library(tmp_path: Path, cli: Cli, registry_db: str) -> dict[str, Path]:
    """The side-by-side library scanned into a registry on SQLite, then on PostgreSQL."""
    files = side_by_side(tmp_path / "sd")
    cli("roots", "add", files["a1111"])
    cli("roots", "add", files["comfyui"])
    assert cli.json("scan")["indexed"] == 6
    return files


def tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `root`: inode, mtime and bytes (what must not change when nothing should)."""
    return {str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def passed(path: Path) -> None:
    """A pass verdict recorded for the file, as `verify` records one."""
    record_verification(open_registry(), {
        "file": str(path), "checkpoint": str(path), "checkpoint_sha256": "0" * 64, "verdict": "pass", "reasons": [],
        "coverage": None, "effects": [], "grid": None, "parameters": {}, "seconds": 1.0, "version": "test"})


def test_dupes_by_bytes_tensors_and_name(library, cli, fake_civitai):
    fake_civitai.add_model("Tiny Style", [library["style"]])
    cli.json("enrich", "--all")
    passed(library["style_copy"])
    os.utime(library["style_copy"], ns=(1, 1))  # the ComfyUI copy is older
    cli.json("scan")
    size = library["style"].stat().st_size

    (group,) = cli.json("dupes")
    assert group["key"] == hashlib.sha256(library["style"].read_bytes()).hexdigest()
    assert [(Path(c["path"]).parent.name, c["root"]["layout"], c["size"]) for c in group["copies"]] == [
        ("loras", "comfyui", size), ("Lora", "a1111", size)]
    assert group["bytes_freed"] == size and group["newest"] == str(library["style"])
    assert set(group["with_sources"]) == set(group["passed"]) == {str(library["style"]), str(library["style_copy"])}

    (group,) = cli.json("dupes", "--by", "tensors")  # same tensors, other metadata: a re-tagged copy
    assert sorted(Path(c["path"]).name for c in group["copies"]) == [
        "style-retagged.safetensors", "style.safetensors", "style.safetensors"]
    assert group["bytes_freed"] == 2 * size + library["retagged"].stat().st_size - Path(group["newest"]).stat().st_size

    (group,) = cli.json("dupes", "--by", "name")  # one name, two contents
    assert {c["path"] for c in group["copies"]} == {str(library["comfy_only"]), str(library["twin_name"])}
    assert group["bytes_freed"] is None
    code, out, _ = cli("dupes")
    assert code == 0 and "newest,source,pass" in out and out.splitlines()[-1] == "1 groups, 17.5 KiB to free"


def test_dedupe_dry_run_then_hard_links_after_comparing_bytes(library, cli):
    before = tree(library["root"])
    (planned,) = cli.json("dedupe", "--dry-run")
    assert planned["status"] == "would link" and planned["bytes_freed"] == library["style"].stat().st_size
    code, out, _ = cli("dedupe", "--dry-run")
    assert code == 0 and out.splitlines()[-1] == "1 copies to link, would free 17.5 KiB"
    assert tree(library["root"]) == before  # a dry run changes nothing

    (linked,) = cli.json("dedupe", "--keep", "first-root")
    assert (linked["status"], linked["kept"], linked["path"]) == (
        "linked", str(library["style"]), str(library["style_copy"]))  # A1111 was added first
    assert same_inode(library["style"], library["style_copy"])
    assert library["style_copy"].read_bytes() == before["stable-diffusion-webui/models/Lora/style.safetensors"][2]
    assert cli.json("dupes")[0]["bytes_freed"] == 0
    assert cli.json("scan")["unchanged"] == 6  # the registry follows: nothing looks changed
    assert cli.json("show", library["style_copy"])["history"][0]["action"] == "dedupe"
    assert sum(r["bytes"] for r in cli.json("du")) == sum(
        p.stat().st_size for p in library["root"].rglob("*.safetensors")) - library["style"].stat().st_size


def test_dedupe_never_links_a_copy_whose_bytes_differ_and_a_failure_leaves_it_as_it_was(library, cli, monkeypatch):
    copy = library["style_copy"]
    stat = copy.stat()
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1  # same size and mtime, other bytes: the stored hash is stale
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (outcome,) = cli.json("dedupe")
    assert outcome["status"] == "skipped" and "bytes differ" in outcome["reason"]
    assert copy.read_bytes() == bytes(data) and not same_inode(copy, library["style"])

    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", refuse)
        code, out, _ = cli("dedupe")
    assert code == 1 and out.startswith("failed ")
    assert copy.read_bytes() == bytes(data) and not same_inode(copy, library["style"])
    assert [p.name for p in copy.parent.iterdir() if p.name.startswith(".")] == []  # no temporary link left

    (outcome,) = cli.json("dedupe", "--link", "sym")
    assert (outcome["status"], outcome["kept"]) == ("linked", str(copy))  # the newest copy is kept
    assert library["style"].is_symlink() and os.readlink(library["style"]) == str(copy)
    assert library["style"].read_bytes() == bytes(data)


def test_du_and_list_columns_and_show(library, cli):
    shutil.copy(REAL / "lora_disney.safetensors", library["comfyui"] / "models" / "loras" / "disney.safetensors")
    cli.json("scan")
    rows = {r["group"]: r for r in cli.json("du")}
    lora_bytes = sum(p.stat().st_size for p in library["root"].rglob("*.safetensors") if "embeddings" not in str(p))
    assert (rows["lora"]["bytes"], rows["lora"]["files"], rows["lora"]["copies"]) == (lora_bytes, 5, 6)
    assert rows["embedding"]["files"] == 1
    assert {r["group"] for r in cli.json("du", "--by", "base")} == {"sd1"}
    by_root = {r["group"]: r["copies"] for r in cli.json("du", "--by", "root")}
    assert by_root == {f"{library['comfyui']} (comfyui)": 4, f"{library['a1111']} (a1111)": 3}
    assert [r["group"] for r in cli.json("du", "--by", "source")] == ["(none)"]
    code, out, _ = cli("du")
    assert code == 0 and out.splitlines()[0].split() == ["KIND", "SIZE", "FILES", "COPIES"]
    assert out.splitlines()[1].split()[:3] == ["lora", "1.59", "MiB"]

    code, out, _ = cli("list", "--columns", "name,triggers")
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert out.splitlines()[0].split() == ["NAME", "TRIGGERS"]
    assert lines["disney.safetensors"].split(None, 1)[1].startswith("<s1>, <s2>")  # a cloneofsimo LoRA's tokens
    assert lines["badhands.safetensors"].split()[1] == "badhands"  # an embedding's own word: its file name
    code, out, _ = cli("list", "--columns", "id,size,path", "--kind", "embedding")
    assert out.splitlines()[1].split()[1:] == ["6.08", "KiB", str(library["badhands"])]
    code, _, err = cli("list", "--columns", "name,colour")
    assert code == 2 and "no column colour" in err

    code, out, _ = cli("show", "style.safetensors")  # by file name: one file, two copies
    assert code == 0
    assert "size           17.5 KiB (17888 bytes)" in out.replace(str(library["style"].stat().st_size), "17888")
    assert f"location       a  {library['style']}  (root 1: a1111)" in out
    assert f"location       a  {library['style_copy']}  (root 2: comfyui)" in out
    code, _, err = cli("show", "castle.safetensors")  # two files of that name
    assert code == 1 and "matches 2 entries" in err


def adapterzoo(tmp_path: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """The real command, with the desktop trash inside the test's folder (send2trash reads XDG_DATA_HOME once)."""
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "ADAPTERZOO_HOST": "a"}
    return subprocess.run([sys.executable, "-m", "adapterzoo", *map(str, args)], capture_output=True, text=True,
                          env=env, check=False)


def test_rm_moves_copies_and_sidecars_to_the_trash_and_the_registry_follows(tmp_path, library, cli):
    trash = tmp_path / "xdg" / "Trash"
    run = adapterzoo(tmp_path, "rm", library["style"], "--json")
    assert run.returncode == 0, run.stderr
    (outcome,) = json.loads(run.stdout)
    assert outcome["status"] == "trashed" and sorted(Path(p).name for p in outcome["sidecars"]) == [
        "style.civitai.info", "style.json", "style.preview.png"]
    assert sorted(p.name for p in (trash / "files").iterdir()) == [
        "style.civitai.info", "style.json", "style.preview.png", "style.safetensors"]
    assert (trash / "files" / "style.safetensors").read_bytes() == library["style_copy"].read_bytes()
    assert not list(library["style"].parent.glob("style.*"))
    shown = cli.json("show", library["style_copy"])  # the other copy stays, the registry forgot the trashed one
    assert locations(shown) == {str(library["style_copy"]): False}
    assert shown["history"][0]["action"] == "trash" and shown["history"][0]["path"] == str(library["style"])

    before = tree(library["root"])
    run = adapterzoo(tmp_path, "rm", "castle.safetensors")  # two files have that name: nothing happens
    assert run.returncode == 1 and "matches 2 entries" in run.stderr and tree(library["root"]) == before
    entry_id = shown["id"]
    run = adapterzoo(tmp_path, "rm", str(entry_id))  # an id: every copy here
    assert run.returncode == 0 and run.stdout.startswith(f"trashed  {library['style_copy']}")
    assert not library["style_copy"].exists()
    assert cli.json("show", entry_id)["locations"] == []


def test_prune_lists_first_and_forgets_only_with_yes(library, cli):
    passed(library["twin_name"])
    library["twin_name"].unlink()
    library["style_copy"].unlink()
    assert cli.json("scan")["missing"] == 2
    assert cli.json("prune", "--older-than", "1") == {"forgotten": False, "locations": [], "files": []}
    code, out, _ = cli("prune", "--older-than", "0")
    assert code == 0 and out.splitlines()[-1] == "2 locations and 1 files would be forgotten: run again with --yes"
    assert len(cli.json("list")) == 5  # only listed
    done = cli.json("prune", "--older-than", "0", "--yes")
    assert done["forgotten"] and {Path(loc["path"]).parent.name for loc in done["locations"]} == {"Lora", "loras"}
    (forgotten,) = done["files"]
    assert forgotten["paths"] == [str(library["twin_name"])]
    entries = {e["name"]: e for e in cli.json("list")}
    assert locations(entries["style.safetensors"]) == {str(library["style"]): False}  # one copy left: kept
    assert [e["path"] for e in cli.json("list") if e["name"] == "castle.safetensors"] == [str(library["comfy_only"])]
    code, _, err = cli("show", str(forgotten["id"]))
    assert code == 1 and "nothing in the registry matches" in err
    assert cli.json("prune", "--older-than", "0")["locations"] == []


@pytest.fixture
def pulled(tmp_path, library, cli, fake_civitai) -> dict[str, Path]:
    """Two LoRAs pulled from (the fake) Civitai into A1111's folder, with their sidecars, model and version
    names and creator recorded."""
    knight = lora(tmp_path / "offered" / "knight.safetensors", seed=11)
    castle = lora(tmp_path / "offered" / "knight-castle.safetensors", seed=12)
    model = fake_civitai.add_model("Tiny Knight", [knight], version_name="v1")
    fake_civitai.add_version(model, [castle], "SD 1.5", ["castle"], name="v2")
    for version in model.versions:
        outcome, = cli.json("pull", f"civitai:{version.id}", "--library", library["a1111"])
        assert outcome["status"] == "pulled", outcome
    return {"knight": library["a1111"] / "models" / "Lora" / "knight.safetensors",
            "castle": library["a1111"] / "models" / "Lora" / "knight-castle.safetensors"}


def test_organize_moves_files_and_sidecars_inside_their_ui_folder_and_the_registry_follows(library, pulled, cli):
    template = "{creator}/{model_name}/{version_name}/{file_name}"
    before = tree(library["root"])
    plan = {Path(s["path"]).name: s for s in cli.json("organize", "--template", template, "--dry-run")}
    assert tree(library["root"]) == before
    lora_folder = library["a1111"] / "models" / "Lora"
    assert plan["knight.safetensors"]["to"] == str(lora_folder / "tester" / "Tiny Knight" / "v1" / "knight.safetensors")
    assert plan["style.safetensors"]["status"] == "skipped" and "no creator" in plan["style.safetensors"]["reason"]

    knight_id = cli.json("show", pulled["knight"])["id"]
    steps = {Path(s["path"]).name: s for s in cli.json("organize", "--template", template)}
    new = lora_folder / "tester" / "Tiny Knight" / "v1"
    assert steps["knight.safetensors"]["status"] == "moved"
    assert sorted(p.name for p in new.iterdir()) == [
        "knight.civitai.info", "knight.preview.png", "knight.safetensors"]
    assert not pulled["knight"].exists() and not pulled["knight"].with_suffix(".civitai.info").exists()
    assert (new / "knight.safetensors").read_bytes() == before["stable-diffusion-webui/models/Lora/knight.safetensors"][2]
    shown = cli.json("show", knight_id)
    assert locations(shown) == {str(new / "knight.safetensors"): False}
    assert shown["preview_path"] == str(new / "knight.preview.png")
    assert (shown["history"][0]["action"], shown["history"][0]["state"]) == ("organize", "done")
    assert cli.json("scan")["unchanged"] == 8  # nothing to re-read: the registry already knows

    # A name that is taken gets the AutoV2 suffix; nothing is overwritten.
    lora(lora_folder / "elsewhere" / "style.safetensors", seed=30)
    cli.json("scan")
    steps = cli.json("organize", "--template", "elsewhere", "--root", library["a1111"])
    moved = next(s for s in steps if s["path"] == str(library["style"]))
    sha = hashlib.sha256(before["stable-diffusion-webui/models/Lora/style.safetensors"][2]).hexdigest()
    assert moved["to"] == str(lora_folder / "elsewhere" / f"style.{sha[:10]}.safetensors")
    assert (lora_folder / "elsewhere" / "style.safetensors").read_bytes() != (
        lora_folder / "elsewhere" / f"style.{sha[:10]}.safetensors").read_bytes()
    assert (lora_folder / "elsewhere" / f"style.{sha[:10]}.civitai.info").is_file()  # sidecars follow the name
    assert all(s["path"].startswith(str(library["a1111"])) for s in steps)  # --root: A1111's files only


def test_organize_link_keeps_the_old_path_too(library, cli):
    (step,) = [s for s in cli.json("organize", "--template", "{base}", "--link", "--root", library["comfyui"])
               if s["path"] == str(library["comfy_only"])]
    target = library["comfyui"] / "models" / "loras" / "sd1" / "castle.safetensors"
    assert step["status"] == "linked" and same_inode(library["comfy_only"], target)
    assert locations(cli.json("show", target)) == {str(library["comfy_only"]): False, str(target): False}


@pytest.mark.parametrize("crash", ["between a model and its sidecars", "before the registry follows"])
def test_an_interrupted_organize_loses_nothing_and_a_rerun_finishes_it(library, cli, monkeypatch, crash):
    files = {p: p.read_bytes() for p in library["root"].rglob("*") if p.is_file()}
    calls = []
    real_move, real_find = organize_module.move_new, organize_module.find_entries

    def move_then_stop(source, target):  # A1111's style.safetensors has moved: Ctrl-C before its sidecars
        if Path(source).suffix != ".safetensors":
            raise KeyboardInterrupt
        return real_move(source, target)

    def stop_before_recording(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_find(path)

    with monkeypatch.context() as patched:
        if crash == "between a model and its sidecars":
            patched.setattr(organize_module, "move_new", move_then_stop)
        else:
            patched.setattr(organize_module, "find_entries", stop_before_recording)
        code, _, err = cli("organize", "--template", "{kind}")
    assert (code, err.split()) == (130, ["aborted"])  # as Ctrl-C ends it

    for path, data in files.items():  # every file is at its old path or its new one, intact
        new = [p for p in library["root"].rglob(path.name) if p.read_bytes() == data]
        assert path.exists() or new, path
    if crash == "between a model and its sidecars":
        assert (library["a1111"] / "models" / "Lora" / "lora" / "style.safetensors").is_file()
        assert library["style"].with_suffix(".civitai.info").is_file()  # its sidecars had not moved yet
    journal = [event["state"] for entry in cli.json("list") for event in cli.json("show", entry["id"])["history"]]
    assert "planned" in journal and len(journal) == 6  # the whole plan was written before the first move
    steps = cli.json("organize", "--template", "{kind}")
    assert any("interrupted run" in note for s in steps for note in s["notes"])
    everything = sorted(p.relative_to(library["root"]).as_posix() for p in library["root"].rglob("*") if p.is_file())
    assert everything == [
        "ComfyUI/models/loras/lora/castle.safetensors", "ComfyUI/models/loras/lora/style-retagged.safetensors",
        "ComfyUI/models/loras/lora/style.safetensors",
        "stable-diffusion-webui/embeddings/embedding/badhands.safetensors",
        "stable-diffusion-webui/models/Lora/lora/castle.safetensors",
        "stable-diffusion-webui/models/Lora/lora/style.civitai.info",
        "stable-diffusion-webui/models/Lora/lora/style.json",
        "stable-diffusion-webui/models/Lora/lora/style.preview.png",
        "stable-diffusion-webui/models/Lora/lora/style.safetensors", "stable-diffusion-webui/webui-user.sh"]
    report = cli.json("scan")
    assert (report["unchanged"], report["missing"], report["indexed"]) == (6, 0, 0)  # the registry followed
    assert all(not loc["missing"] for e in cli.json("list") for loc in e["locations"])
