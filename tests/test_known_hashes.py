"""Provenance SHA-256 from the registry: a scanned, unchanged large file is not read again; a changed one,
an unscanned one, a missing or unreadable registry all mean hashing, and never a new registry file."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import factory
import pytest
import torch
from cli_helpers import run
from safetensors import safe_open
from safetensors.torch import save_file

from adapterzoo import tiny_models
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint
from adapterzoo.formats.checkpoint_targets import checkpoint_targets
from adapterzoo.zoo import hashing, known_hashes
from adapterzoo.zoo.known_hashes import LOOKUP_FROM_BYTES, hash_in_background, provenance_sha256


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def big(tmp_path) -> Path:
    """A sparse safetensors file just over the lookup size (a checkpoint's stand-in)."""
    (tmp_path / "zoo").mkdir()
    rows = LOOKUP_FROM_BYTES // (2 * 1024) + 1
    return factory.write_sparse_safetensors(tmp_path / "zoo" / "big.safetensors", {"w": ("F16", (rows, 1024))})


def no_hashing(monkeypatch) -> list[Path]:
    """Hashing records the path and answers a digest no file has; returns the record."""
    hashed: list[Path] = []
    for module in (known_hashes, hashing):
        monkeypatch.setattr(module, "sha256_of", lambda path, **_: hashed.append(Path(path)) or "f" * 64)
    return hashed


def test_a_scanned_unchanged_file_takes_its_sha256_from_the_registry(big, capsys, monkeypatch):
    assert run(["scan", str(big.parent)], capsys, monkeypatch)[0] == 0
    hashed = no_hashing(monkeypatch)
    assert provenance_sha256(big) == sha256(big)
    assert hashed == []


def test_a_file_changed_since_its_scan_is_hashed_again(big, capsys, monkeypatch):
    assert run(["scan", str(big.parent)], capsys, monkeypatch)[0] == 0
    stat = big.stat()
    os.utime(big, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    hashed = no_hashing(monkeypatch)
    assert provenance_sha256(big) == "f" * 64
    assert hashed == [big]


def test_without_a_registry_the_file_is_hashed_and_no_registry_is_made(big, tmp_path, monkeypatch):
    registry = tmp_path / "registry.db"
    assert provenance_sha256(big, str(registry)) == sha256(big)
    assert not registry.exists()


def test_an_unreadable_registry_means_hashing_not_an_error(big, tmp_path):
    registry = tmp_path / "registry.db"
    registry.write_bytes(b"not a database" * 100)
    assert provenance_sha256(big, str(registry)) == sha256(big)
    assert registry.read_bytes() == b"not a database" * 100


def test_small_files_and_folders_are_hashed_without_asking_the_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(known_hashes, "registered_sha256", lambda *a: pytest.fail("the registry was asked"))
    small = tmp_path / "lora.safetensors"
    small.write_bytes(b"x" * 1000)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.json").write_text("{}")
    assert provenance_sha256(small) == sha256(small)
    assert provenance_sha256(tmp_path / "folder") == {"a.json": sha256(tmp_path / "folder" / "a.json")}


def test_cli_merge_records_the_registrys_sha256_of_scanned_inputs(tmp_path, capsys, monkeypatch):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    checkpoint, lora = zoo / "tiny.safetensors", zoo / "tiny_lora.safetensors"
    convert_checkpoint(tiny_models.save_tiny_pipeline("sd1", tmp_path / "pipeline", seed=1), checkpoint, "ldm")
    architecture = checkpoint_targets(checkpoint).architecture
    target = next(t for t in architecture.targets.values() if t.path.endswith("attn1.to_q"))
    name = architecture.kohya_name(target)
    save_file({f"{name}.lora_down.weight": torch.randn(2, target.shape[1]),
               f"{name}.lora_up.weight": torch.randn(target.shape[0], 2), f"{name}.alpha": torch.tensor(2.0)},
              str(lora))
    assert run(["scan", str(zoo)], capsys, monkeypatch)[0] == 0
    monkeypatch.setattr(known_hashes, "LOOKUP_FROM_BYTES", 0)  # the tiny files stand in for large ones
    hashed = no_hashing(monkeypatch)
    code, _, err = run(["merge", str(checkpoint), "--lora", f"{lora}:0.5", "-o", str(tmp_path / "out.safetensors")],
                       capsys, monkeypatch)
    assert code == 0, err
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as fh:
        record = json.loads(fh.metadata()["adapterzoo.operation"])
    assert [entry["sha256"] for entry in record["inputs"]] == [sha256(checkpoint), sha256(lora)]
    assert hashed == []


def test_background_hashes_answer_each_input_and_raise_its_error_where_asked(tmp_path):
    files = []
    for name in ("a.safetensors", "b.safetensors", "c.safetensors"):
        files.append(tmp_path / name)
        files[-1].write_bytes(name.encode() * 1000)
    sha = hash_in_background([files[0], tmp_path / "gone.safetensors", files[1]], str(tmp_path / "registry.db"))
    assert sha(files[1]) == sha256(files[1]) and sha(files[0]) == sha256(files[0])
    assert sha(files[2]) == sha256(files[2])  # not started early: hashed when asked
    with pytest.raises(AdapterzooError, match="gone.safetensors"):
        sha(tmp_path / "gone.safetensors")


def test_a_command_run_in_process_stops_hashing_its_inputs_when_it_ends(tmp_path, capsys, monkeypatch):
    """A process's exit ends the daemon thread that hashes a command's inputs; run in-process, the command's end
    must, or a refused merge goes on reading its input (here 64 GiB, a minute of a core) through later tests."""
    huge = factory.write_sparse_safetensors(tmp_path / "huge.safetensors", {"w": ("F32", (1 << 34,))})
    lora = factory.write_sparse_safetensors(tmp_path / "lora.safetensors", {"x": ("F32", (4,))})
    code, _, err = run(["merge", str(huge), "--lora", str(lora), "-o", str(tmp_path / "out.safetensors")],
                       capsys, monkeypatch)
    assert code == 1 and err.startswith("error: "), err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(t.name == "provenance-sha256" for t in threading.enumerate()):
        time.sleep(0.05)
    assert [t.name for t in threading.enumerate() if t.name == "provenance-sha256"] == []
