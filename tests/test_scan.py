"""`scan`, `list`, `show` on a small A1111 + ComfyUI library with bad, hostile and sidecar files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import factory
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from sqlalchemy import create_engine, text

from adapterzoo.cli import cli
from adapterzoo.formats import probe as probe_module
from adapterzoo.zoo import hashing
from adapterzoo.zoo.db import open_registry
from adapterzoo.zoo.scan import scan_paths

LORA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
REQUIRED_JSON = ("id", "path", "kind", "base", "format", "sha256", "autov1", "autov2", "autov3", "blake3",
                 "crc32", "error")


def kohya_lora(path: Path, metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    """A one-module SD1 kohya LoRA (cross-attention to_k: context width 768)."""
    gen = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            f"{LORA}.lora_down.weight": torch.randn(4, 768, generator=gen),
            f"{LORA}.lora_up.weight": torch.randn(320, 4, generator=gen),
            f"{LORA}.alpha": torch.tensor(4.0),
        },
        str(path),
        metadata=metadata,
    )
    return path


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


class Hostile:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def library(tmp_path: Path) -> dict[str, Path]:
    """An A1111 install and a ComfyUI install, with sidecars, folders, junk and bad files."""
    root = tmp_path / "library"
    a1111 = root / "stable-diffusion-webui"
    comfy = root / "ComfyUI"
    files: dict[str, Path] = {}
    files["style"] = kohya_lora(
        a1111 / "models/Lora/style.safetensors",
        {
            "modelspec.trigger_phrase": "ohwx style",
            "ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx": 20, " 1girl ": 12, "solo": 12}, "5_reg": {"solo": 3}}),
            "ss_training_comment": "x" * (1 << 20),  # past 1 MiB, so its AutoV1 is not that of an empty span
        },
    )
    write(a1111 / "models/Lora/style.civitai.info", json.dumps({"id": 7, "trainedWords": ["ohwx style", "inkwash"]}))
    write(a1111 / "models/Lora/style.json", json.dumps({"activation text": "ink painting"}))
    write(a1111 / "models/Lora/style.png", b"png")
    write(a1111 / "models/Lora/style.preview.png", b"preview png")
    files["nested"] = kohya_lora(a1111 / "models/Lora/characters/nested.safetensors", seed=1)
    emb = a1111 / "embeddings/badhands.pt"
    emb.parent.mkdir(parents=True)
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "name": "badhands", "step": 100}, emb)
    files["embedding"] = emb
    files["comfy_lora"] = kohya_lora(comfy / "models/loras/comfy.sft", seed=2)
    peft = comfy / "models/loras/peft_adapter"
    write(peft / "adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    prefix = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{prefix}.lora_A.weight": torch.randn(4, 768), f"{prefix}.lora_B.weight": torch.randn(320, 4)},
              str(peft / "adapter_model.safetensors"))
    files["peft"] = peft
    pipe = comfy / "models/diffusers/tiny-sd15"
    write(pipe / "model_index.json", json.dumps({"_class_name": "StableDiffusionPipeline",
                                                 "unet": ["diffusers", "UNet2DConditionModel"]}))
    write(pipe / "unet/config.json", json.dumps({"cross_attention_dim": 768, "in_channels": 4}))
    save_file({"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.randn(320, 768)},
              str(pipe / "unet/diffusion_pytorch_model.safetensors"))
    files["diffusers"] = pipe

    bad = a1111 / "models/Stable-diffusion"
    good_bytes = files["nested"].read_bytes()
    files["empty"] = write(bad / "empty.safetensors", b"")
    files["truncated"] = write(bad / "truncated.safetensors", good_bytes[: len(good_bytes) // 2])
    files["random"] = write(bad / "random.ckpt", random.Random(0).randbytes(4096))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    files["lying"] = write(bad / "lying.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 64)
    files["hostile"] = write(root / "hostile.pt", pickle.dumps(Hostile(tmp_path / "PWNED")))

    write(a1111 / "models/Lora/.hidden.safetensors", good_bytes)
    write(a1111 / "models/Lora/download.safetensors.part", good_bytes)
    write(a1111 / "models/Lora/.cache/cached.safetensors", good_bytes)
    write(a1111 / "models/Lora/last.optim.pt", b"optimizer state")
    write(a1111 / "models/Lora/notes.txt", "not a model")
    files["root"] = root
    files["marker"] = tmp_path / "PWNED"
    return files


def folder_digest(folder: Path) -> str:
    """What verify records a folder checkpoint by: SHA-256 of the sorted {relative path: SHA-256} JSON."""
    listing = {f.relative_to(folder).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
               for f in folder.rglob("*") if f.is_file()}
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def scan_json(*dirs: Path) -> dict[str, Any]:
    return json.loads(invoke("scan", *map(str, dirs), "--json").stdout)


def adapterzoo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real console command, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "adapterzoo", *args], capture_output=True, text=True, cwd=cwd)


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            stat = os.lstat(os.path.join(dirpath, name))
            snap[os.path.relpath(os.path.join(dirpath, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return snap


def test_scan_indexes_the_library_and_records_bad_files(library: dict[str, Path]) -> None:
    before = tree_snapshot(library["root"])
    report = scan_json(library["root"])
    rows = {Path(r["path"]).name: r for r in report["files"]}

    assert set(rows) == {"style.safetensors", "nested.safetensors", "badhands.pt", "comfy.sft", "peft_adapter",
                         "tiny-sd15", "empty.safetensors", "truncated.safetensors", "random.ckpt",
                         "lying.safetensors", "hostile.pt"}
    assert {k: report[k] for k in ("indexed", "unchanged", "broken", "unsafe", "missing")} == {
        "indexed": 11, "unchanged": 0, "broken": 4, "unsafe": 1, "missing": 0}
    for row in report["files"]:
        assert set(REQUIRED_JSON) <= set(row)

    style = rows["style.safetensors"]
    data = library["style"].read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    assert (style["kind"], style["base"], style["format"], style["rank"], style["alpha"]) == (
        "lora", "sd1", "kohya", 4, 4.0)
    assert style["sha256"] == hashlib.sha256(data).hexdigest()
    assert style["autov2"] == style["sha256"][:10]
    assert style["autov3"] == hashlib.sha256(data[header_end:]).hexdigest()
    assert int(style["crc32"], 16) == zlib.crc32(data)
    assert style["size"] == len(data) and style["error"] is None and style["status"] == "ok"
    assert rows["badhands.pt"]["kind"] == "embedding"
    assert rows["comfy.sft"]["kind"] == "lora"

    for folder, kind in (("peft_adapter", "lora"), ("tiny-sd15", "checkpoint")):
        assert rows[folder]["is_folder"] and rows[folder]["kind"] == kind
        assert rows[folder]["sha256"] == folder_digest(library["peft" if kind == "lora" else "diffusers"])
        assert rows[folder]["autov2"] is None
    assert rows["peft_adapter"]["format"] == "peft" and rows["tiny-sd15"]["format"] == "diffusers"

    for name in ("empty.safetensors", "truncated.safetensors", "random.ckpt", "lying.safetensors", "hostile.pt"):
        row = rows[name]
        assert row["kind"] == "unknown" and row["error"] and "\n" not in row["error"], row
        assert row["unsafe"] is (name == "hostile.pt")
        assert row["sha256"] == hashlib.sha256(library[name.split(".")[0]].read_bytes()).hexdigest()
    assert "unsafe pickle" in rows["hostile.pt"]["error"] and "posix.system" in rows["hostile.pt"]["error"]
    assert not library["marker"].exists()
    assert tree_snapshot(library["root"]) == before


def test_summary_names_each_bad_file_and_exits_0(library: dict[str, Path]) -> None:
    run = adapterzoo("scan", str(library["root"]))
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # no progress bar when stderr is not a terminal
    lines = run.stdout.splitlines()
    assert lines[-1] == "11 indexed, 0 unchanged, 4 broken, 1 unsafe, 0 missing"
    assert sorted(line.split(": ")[0] for line in lines[:-1]) == ["broken"] * 4 + ["unsafe"]
    assert f"unsafe: {library['hostile']}: unsafe pickle" in run.stdout
    assert not library["marker"].exists()


def test_rescan_reads_only_changed_files_and_flags_missing_ones(
    library: dict[str, Path], monkeypatch: pytest.MonkeyPatch, registry_db: str
) -> None:
    first = scan_json(library["root"])
    ids = {r["path"]: r["id"] for r in first["files"]}
    probed: list[str] = []
    real_probe = probe_module.probe

    def counting_probe(path: Any) -> Any:
        probed.append(Path(path).name)
        return real_probe(path)

    monkeypatch.setattr(probe_module, "probe", counting_probe)
    again = scan_json(library["root"])
    assert (again["indexed"], again["unchanged"], again["broken"], again["unsafe"]) == (0, 11, 4, 1)
    assert probed == []

    kohya_lora(library["style"], seed=5)  # new content, new mtime
    library["nested"].unlink()
    shutil.rmtree(library["peft"])
    changed = scan_json(library["root"])
    assert probed == ["style.safetensors"]
    assert (changed["indexed"], changed["unchanged"], changed["missing"]) == (1, 8, 2)
    rows = {r["path"]: r for r in json.loads(invoke("list", "--json").stdout)}
    assert len(rows) == 11
    # New bytes at a known path are a new file (a file is its content); the old content keeps its id, its
    # sources and verifications, and is listed no more: no location holds it.
    old_id = ids[str(library["style"])]
    assert rows[str(library["style"])]["id"] != old_id
    assert rows[str(library["style"])]["sha256"] == hashlib.sha256(library["style"].read_bytes()).hexdigest()
    old = json.loads(invoke("show", str(old_id), "--json").stdout)
    assert (old["locations"], old["path"], old["status"]) == ([], None, "missing")
    assert rows[str(library["nested"])]["missing"] and rows[str(library["nested"])]["status"] == "missing"
    assert rows[str(library["peft"])]["missing"] and rows[str(library["peft"])]["kind"] == "lora"

    kohya_lora(library["nested"], seed=1)
    back = scan_json(library["root"])
    assert back["missing"] == 1
    assert not {r["path"]: r for r in back["files"]}[str(library["nested"])]["missing"]


def test_a_thousand_unchanged_files_rescan_in_under_two_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = kohya_lora(tmp_path / "template.safetensors").read_bytes()
    root = tmp_path / "many"
    for i in range(1000):
        write(root / f"group{i % 10}" / f"lora_{i:04d}.safetensors", template)
    engine = open_registry()
    start = time.perf_counter()
    assert scan_paths([root], engine).indexed == 1000
    first_s = time.perf_counter() - start

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an unchanged file was read again")

    monkeypatch.setattr(probe_module, "probe", must_not_run)
    monkeypatch.setattr(hashing, "hash_file", must_not_run)
    start = time.perf_counter()
    report = scan_paths([root], engine)
    rescan_s = time.perf_counter() - start
    assert (report.unchanged, report.indexed, report.missing) == (1000, 0, 0)
    assert rescan_s < 2.0, f"rescan took {rescan_s:.2f} s (first scan {first_s:.2f} s)"
    print(f"1000 files: first scan {first_s:.2f} s, unchanged rescan {rescan_s:.3f} s")


def test_two_scans_of_one_folder_at_once(tmp_path: Path, registry_db: str) -> None:
    template = kohya_lora(tmp_path / "template.safetensors").read_bytes()
    root = tmp_path / "shared"
    for i in range(300):
        write(root / f"lora_{i:03d}.safetensors", template[:-4] + struct.pack("<f", float(i)))
    write(root / "broken.safetensors", b"garbage")
    scans = [subprocess.Popen([sys.executable, "-m", "adapterzoo", "scan", str(root)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [scan.communicate(timeout=300) for scan in scans]
    for scan, (out, err) in zip(scans, outputs, strict=True):
        assert scan.returncode == 0 and err == "", err
        assert out.splitlines()[-1].endswith("1 broken, 0 unsafe, 0 missing")
    with create_engine(registry_db).connect() as connection:
        count, paths = connection.execute(text("SELECT COUNT(*), COUNT(DISTINCT path) FROM locations")).one()
        files = connection.execute(text("SELECT COUNT(*) FROM files")).scalar_one()
    assert count == paths == files == 301


def test_trigger_words_and_preview_come_from_metadata_and_sidecars(
    library: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = {Path(r["path"]).name: r for r in scan_json(library["root"])["files"]}
    style = rows["style.safetensors"]
    # modelspec phrase, A1111 activation text, Civitai trainedWords, then tags by total count
    assert style["trigger_words"] == ["ohwx style", "ink painting", "inkwash", "ohwx", "solo", "1girl"]
    assert style["preview_path"] == str(library["style"].with_name("style.preview.png"))
    assert rows["nested.safetensors"]["trigger_words"] == [] and rows["nested.safetensors"]["preview_path"] is None

    monkeypatch.setattr(probe_module, "probe", lambda path: pytest.fail(f"{path} was probed again"))
    write(library["nested"].with_name("nested.webp"), b"webp")
    info = library["nested"].with_name("nested.civitai.info")
    write(info, json.dumps({"trainedWords": ["new word"]}))
    os.utime(info, ns=(time.time_ns() + 10**9,) * 2)
    rows = {Path(r["path"]).name: r for r in scan_json(library["root"])["files"]}
    assert rows["nested.safetensors"]["preview_path"] == str(library["nested"].with_name("nested.webp"))
    assert rows["nested.safetensors"]["trigger_words"] == ["new word"]


def test_list_filters_by_kind_base_and_query(library: dict[str, Path], registry_db: str) -> None:
    scan_json(library["root"])

    def names(*args: str) -> list[str]:
        return sorted(Path(r["path"]).name for r in json.loads(invoke("list", *args, "--json").stdout))

    assert names("--kind", "lora") == ["comfy.sft", "nested.safetensors", "peft_adapter", "style.safetensors"]
    assert names("--kind", "checkpoint", "--base", "sd1") == ["tiny-sd15"]
    assert names("--query", "INKWASH") == ["style.safetensors"]
    assert names("--query", "characters") == ["nested.safetensors"]
    assert names("--query", "100%") == []
    assert len(names()) == 11
    table = invoke("list", "--kind", "embedding").stdout.splitlines()
    assert table[0].split() == ["ID", "KIND", "BASE", "FORMAT", "RANK", "AUTOV2", "STATUS", "VERIFIED", "NAME"]
    autov2 = hashlib.sha256(library["embedding"].read_bytes()).hexdigest()[:10]
    assert len(table) == 2 and table[1].split()[1:] == ["embedding", "sd1", "a1111", autov2, "ok", "-", "badhands.pt"]
    assert CliRunner().invoke(cli, ["list", "--kind", "banana"]).exit_code == 2


def test_show_finds_an_entry_by_id_path_any_hash_or_sha256_prefix(
    library: dict[str, Path], monkeypatch: pytest.MonkeyPatch, registry_db: str
) -> None:
    style = {Path(r["path"]).name: r for r in scan_json(library["root"])["files"]}["style.safetensors"]
    refs = [str(style["id"]), str(library["style"]), style["sha256"][:8], style["sha256"].upper(),
            *(style[h] for h in ("sha256", "autov1", "autov2", "autov3", "blake3", "crc32"))]
    for ref in refs:
        shown = json.loads(invoke("show", ref, "--json").stdout)
        assert shown["id"] == style["id"] and shown["sha256"] == style["sha256"], ref
    monkeypatch.chdir(library["style"].parent)
    assert json.loads(invoke("show", "style.safetensors", "--json").stdout)["id"] == style["id"]
    text = invoke("show", str(style["id"])).stdout
    assert f"path           {library['style']}" in text
    assert "trigger_words  ohwx style, ink painting, inkwash, ohwx" in text


def test_show_of_an_unknown_or_ambiguous_thing_is_one_line_and_exit_1(library: dict[str, Path]) -> None:
    shutil.copy2(library["style"], library["root"] / "copy_of_style.safetensors")
    kohya_lora(library["root"] / "other" / "comfy.sft", seed=9)  # another file under a name the library has
    scan_json(library["root"])
    sha = hashlib.sha256(library["style"].read_bytes()).hexdigest()
    copies = json.loads(adapterzoo("show", sha, "--json").stdout)  # one content, found at two paths
    assert sorted(Path(loc["path"]).name for loc in copies["locations"]) == ["copy_of_style.safetensors",
                                                                            "style.safetensors"]
    for ref, message in (("deadbeefcafe", "nothing in the registry matches 'deadbeefcafe'"),
                         ("9999", "nothing in the registry matches '9999'"),
                         ("e3b0c442", "matches 9 entries"),  # the AutoV1 of each of the 9 files under 1 MiB
                         ("comfy.sft", "matches 2 entries")):
        run = adapterzoo("show", ref)
        assert run.returncode == 1 and run.stdout == ""
        assert run.stderr.startswith("error: ") and message in run.stderr and run.stderr.count("\n") == 1


def test_a_file_name_that_is_not_utf8_is_reported_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "odd"
    root.mkdir()
    good = kohya_lora(root / "good.safetensors")
    odd = os.fsencode(root) + b"/caf\xe9.safetensors"
    try:
        Path(os.fsdecode(odd)).write_bytes(good.read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    run = adapterzoo("scan", str(root))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"skipped: {root}/caf\ufffd.safetensors: its name is not valid UTF-8",
        "1 indexed, 0 unchanged, 0 broken, 0 unsafe, 0 missing",
    ]


def test_per_component_peft_folders_are_one_entry_and_separate_adapters_stay_separate(tmp_path: Path) -> None:
    """diffusers saves a LoRA as unet/ + text_encoder/ adapters: one entry. A folder of adapters under other
    names is a collection, and each is its own entry."""
    factory.CASES["peft-components-sd1"](tmp_path / "components")
    collection = tmp_path / "collection"
    for name in ("style_a", "style_b"):
        shutil.copytree(tmp_path / "components" / "adapter" / "unet", collection / name)
    rows = {Path(r["path"]).relative_to(tmp_path).as_posix(): r for r in scan_json(tmp_path)["files"]}
    assert set(rows) == {"components/adapter", "collection/style_a", "collection/style_b"}
    assert all(row["kind"] == "lora" and row["format"] == "peft" for row in rows.values())
