"""Provenance SHA-256 from the registry: a scanned, unchanged large file is not read again; a changed one,
an unscanned one, a missing or unreadable registry all mean hashing, and never a new registry file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import factory
import pytest
from cli_helpers import run

from adapterzoo.zoo import known_hashes
from adapterzoo.zoo.known_hashes import LOOKUP_FROM_BYTES, provenance_sha256


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def big(tmp_path) -> Path:
    """A sparse safetensors file just over the lookup size (a checkpoint's stand-in)."""
    (tmp_path / "zoo").mkdir()
    rows = LOOKUP_FROM_BYTES // (2 * 1024) + 1
    return factory.write_sparse_safetensors(tmp_path / "zoo" / "big.safetensors", {"w": ("F16", (rows, 1024))})


def no_hashing(monkeypatch) -> list[Path]:
    hashed: list[Path] = []
    monkeypatch.setattr(known_hashes, "sha256_of", lambda path: hashed.append(Path(path)) or "f" * 64)
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
