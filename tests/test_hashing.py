"""hash_file: every digest checked against hashlib/blake3/zlib run separately on the file's bytes."""

from __future__ import annotations

import hashlib
import random
import struct
import threading
import zlib
from pathlib import Path

import blake3
import factory
import pytest
import torch
from safetensors.torch import save_file

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.io.safetensors_header import read_header
from adapterzoo.zoo import hashing
from adapterzoo.zoo.hashing import FileHashes, hash_file

MIB = 1 << 20
REAL = factory.REAL
# Around the AutoV1 window [1 MiB, 1 MiB + 64 KiB), plus sizes past one 8 MiB read chunk.
SIZES = [0, 1, 100_000, MIB - 1, MIB, MIB + 1, MIB + 65535, MIB + 65536, MIB + 65537,
         3 * MIB + 12345, 2 * hashing.CHUNK_BYTES + 7]


def expected(data: bytes, data_offset: int | None) -> dict[str, str | None]:
    """The definitions of FORMATS.md §6, written out on the whole byte string."""
    full = hashlib.sha256(data).hexdigest()
    return {
        "sha256": full,
        "autov1": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        "autov2": full[:10],
        "autov3": None if data_offset is None else hashlib.sha256(data[data_offset:]).hexdigest(),
        "blake3": blake3.blake3(data).hexdigest(),
        "crc32": format(zlib.crc32(data), "08x"),
    }


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("hashing")
    rng = random.Random(1234)
    out = {}
    for size in SIZES:
        out[size] = folder / f"{size}.bin"
        out[size].write_bytes(rng.randbytes(size))
    return out


def test_empty_file_matches_published_test_vectors(files: dict[int, Path]) -> None:
    hashes = hash_file(files[0])
    assert hashes == FileHashes(
        sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        autov1="e3b0c442",
        autov2="e3b0c44298",
        autov3=None,
        blake3="af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
        crc32="00000000",
    )


@pytest.mark.parametrize("size", SIZES)
def test_every_digest_matches_an_independent_computation(files: dict[int, Path], size: int) -> None:
    data = files[size].read_bytes()
    offset = min(size, 8 + size // 3)
    assert hash_file(files[size], data_offset=offset).to_json() == expected(data, offset)
    assert hash_file(files[size]).to_json() == expected(data, None)


@pytest.mark.parametrize("offset", [0, 8, 300_007, 300_008, 2 * MIB, 2 * MIB + 99_999, 3 * MIB + 12345])
def test_spans_straddling_read_chunks(files: dict[int, Path], offset: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With an odd chunk size the AutoV1 window and the tensor-data start fall inside and across chunks."""
    monkeypatch.setattr(hashing, "CHUNK_BYTES", 300_007)
    path = files[3 * MIB + 12345]
    assert hash_file(path, data_offset=offset).to_json() == expected(path.read_bytes(), offset)


def test_small_file_read_in_many_chunks_is_hashed_in_order(
    files: dict[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hashing, "CHUNK_BYTES", 4099)
    path = files[100_000]
    assert hash_file(path, data_offset=77).to_json() == expected(path.read_bytes(), 77)


def test_safetensors_autov3_is_the_data_after_the_header(tmp_path: Path) -> None:
    """AutoV3 ignores metadata: two files with the same tensors and different metadata share it."""
    torch.manual_seed(0)
    tensors = {"lora_up.weight": torch.randn(320, 8), "lora_down.weight": torch.randn(8, 768, dtype=torch.float16),
               "alpha": torch.tensor(4.0)}
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, first, metadata={"ss_network_dim": "8"})
    save_file(tensors, second, metadata={"ss_network_dim": "8", "ssmd_display_name": "renamed"})

    results = []
    for path in (first, second):
        data = path.read_bytes()
        (header_len,) = struct.unpack("<Q", data[:8])
        hashes = hash_file(path, data_offset=read_header(path).data_offset)
        assert hashes.to_json() == expected(data, 8 + header_len)
        results.append(hashes)
    assert results[0].autov3 == results[1].autov3
    assert results[0].sha256 != results[1].sha256


@pytest.mark.parametrize("name", ["analog_svd_rank4.safetensors", "lora_disney.safetensors"])
def test_real_lora_files(name: str) -> None:
    path = REAL / name
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    assert hash_file(path, data_offset=8 + header_len).to_json() == expected(data, 8 + header_len)


def test_progress_reports_every_byte_read(files: dict[int, Path]) -> None:
    path = files[2 * hashing.CHUNK_BYTES + 7]
    reported: list[int] = []
    hash_file(path, progress=reported.append)
    assert sum(reported) == path.stat().st_size
    assert len(reported) == 3


def test_to_json_has_every_field_in_order(files: dict[int, Path]) -> None:
    fields = list(hash_file(files[1], data_offset=0).to_json())
    assert fields == ["sha256", "autov1", "autov2", "autov3", "blake3", "crc32"]


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(AdapterzooError, match=r"cannot read .*nope\.safetensors: No such file"):
        hash_file(tmp_path / "nope.safetensors")


def test_data_offset_past_the_end_is_a_bad_file(files: dict[int, Path]) -> None:
    with pytest.raises(BadFileError, match="tensor data should start at byte 100001 but the file is 100000 bytes"):
        hash_file(files[100_000], data_offset=100_001)


def test_a_failing_progress_callback_stops_the_pass_and_leaves_no_threads(files: dict[int, Path]) -> None:
    class Cancelled(Exception):
        pass

    def cancel(_: int) -> None:
        raise Cancelled

    before = threading.active_count()
    with pytest.raises(Cancelled):
        hash_file(files[2 * hashing.CHUNK_BYTES + 7], data_offset=8, progress=cancel)
    assert threading.active_count() == before


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.parametrize("piece", [7, 4099, 300_007, MIB + 3])
def test_stream_hashes_fed_in_any_pieces_match_the_whole_file(
    files: dict[int, Path], threaded: bool, piece: int
) -> None:
    """A download feeds whatever the network hands it; the digests must not depend on the cut points."""
    data = files[3 * MIB + 12345].read_bytes() if piece > 7 else files[100_000].read_bytes()[:20_000]
    offset = 8 + len(data) // 3
    with hashing.StreamHashes(offset, threaded=threaded) as hashes:
        for start in range(0, len(data), piece):
            hashes.update(data[start:start + piece])
    assert hashes.size == len(data)
    assert hashes.result().to_json() == expected(data, offset)


def test_stream_hashes_with_tensor_data_past_the_end_have_no_autov3() -> None:
    with hashing.StreamHashes(data_offset=100, threaded=False) as hashes:
        hashes.update(b"x" * 50)
    assert hashes.result().to_json() == expected(b"x" * 50, None)
