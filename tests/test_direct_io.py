"""Large files past the page cache (O_DIRECT): every byte read or written that way must equal what plain
buffered I/O gives, at unaligned offsets and lengths, across chunk edges, whatever part of the file the page
cache already holds; a file cut short is named. The size from which files go direct is lowered for the test."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io import direct_io, safetensors_writer
from adapterzoo.formats.io.direct_io import ALIGN, ChunkWriter, ReadAhead, SpanReader
from adapterzoo.formats.io.safetensors_writer import write_safetensors
from adapterzoo.formats.io.tensor_source import OrderedViews, open_checkpoint_file
from adapterzoo.zoo.hashing import sha256_of

CHUNK = 64 << 10


@pytest.fixture
def direct(monkeypatch, tmp_path) -> None:
    """Every file direct, in 64 KiB chunks; skips where tmp_path's filesystem refuses O_DIRECT."""
    monkeypatch.setattr(direct_io, "DIRECT_FROM_BYTES", 0)
    monkeypatch.setattr(direct_io, "CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(safetensors_writer, "CHUNK_BYTES", CHUNK)
    with ChunkWriter(tmp_path / "probe", 1) as probe:
        if not probe.direct:
            pytest.skip(f"{tmp_path} refuses O_DIRECT")


def uncached(path: Path) -> None:
    """Drop `path`'s pages from the page cache, so reads of it go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def random_file(path: Path, size: int) -> bytes:
    data = random.Random(size).randbytes(size)
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("past_cache", [True, False])
def test_spans_equal_the_files_bytes_past_the_cache_or_through_it(tmp_path, direct, past_cache):
    data = random_file(tmp_path / "data", 5 * CHUNK + 1234)
    uncached(tmp_path / "data")
    spans = [(0, 1), (1, ALIGN), (ALIGN - 3, 7), (CHUNK - 5, 2 * CHUNK + 11), (3 * CHUNK + 17, 2 * CHUNK),
             (len(data) - 9, 9), (0, len(data))]
    with SpanReader(tmp_path / "data", past_cache) as reader:
        for offset, nbytes in spans:
            assert bytes(reader.span(offset, nbytes)) == data[offset:offset + nbytes], (offset, nbytes)


@pytest.mark.parametrize("go_direct", [True, False])
def test_a_span_past_the_end_is_named_not_misread(tmp_path, monkeypatch, go_direct):
    monkeypatch.setattr(direct_io, "DIRECT_FROM_BYTES", 0 if go_direct else 1 << 40)
    random_file(tmp_path / "short.safetensors", 3 * ALIGN + 5)
    with SpanReader(tmp_path / "short.safetensors", past_cache=True) as reader, pytest.raises(BadFileError) as error:
        reader.span(2 * ALIGN, ALIGN + 6)
    assert str(error.value) == f"short.safetensors ends before byte {3 * ALIGN + 6}; was it changed while being read?"


def test_a_direct_write_is_exactly_the_bytes_given(tmp_path, direct):
    data = random_file(tmp_path / "want", 3 * CHUNK + 777)
    pieces, at = [], 0
    for size in (1, 7, CHUNK - 8, 2 * CHUNK, 777):
        pieces.append(data[at:at + size])
        at += size
    with ChunkWriter(tmp_path / "got", len(data)) as writer:
        assert writer.direct
        for piece in pieces:
            writer.write(memoryview(piece))
    assert (tmp_path / "got").read_bytes() == data


@pytest.mark.parametrize("go_direct", [True, False])
def test_read_ahead_gives_each_range_in_order_and_names_a_file_cut_short(tmp_path, monkeypatch, go_direct):
    monkeypatch.setattr(direct_io, "DIRECT_FROM_BYTES", 0 if go_direct else 1 << 40)
    data = random_file(tmp_path / "a", 3 * CHUNK + 5)
    other = random_file(tmp_path / "b", 2 * ALIGN)
    ranges = [(tmp_path / "a", 7, CHUNK), (tmp_path / "b", 1, 100), (tmp_path / "a", CHUNK + 7, 2 * CHUNK - 2),
              (tmp_path / "a", 3 * CHUNK, 6)]
    with ReadAhead(ranges) as ahead:
        for path, offset, nbytes in ranges[:3]:
            source = data if path.name == "a" else other
            assert bytes(ahead.next()) == source[offset:offset + nbytes]
        with pytest.raises(BadFileError, match=f"^a ends before byte {3 * CHUNK + 6}; was it changed"):
            ahead.next()
    with ReadAhead(ranges) as ahead:  # left after one range: closing stops the thread
        ahead.next()


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {"big.weight": torch.randn(97, 211, generator=generator),  # crosses chunk edges
            "half.weight": torch.randn(33, 65, generator=generator).half(),
            "bf16.weight": torch.randn(129, 3, generator=generator).bfloat16(),
            "ids": torch.arange(13, dtype=torch.int64), "mask": torch.rand(5, generator=generator) > 0.5}


def test_a_safetensors_file_written_past_the_cache_equals_one_written_through_it(tmp_path, direct, monkeypatch):
    save_file(tensors(), str(tmp_path / "in.safetensors"))
    uncached(tmp_path / "in.safetensors")

    def plan() -> list:
        source = open_checkpoint_file(tmp_path / "in.safetensors")
        kept = [source.planned(key, key, None) for key in source.shapes if key != "bf16.weight"]
        return [*kept, source.planned_rows("bf16.weight", "rows", None, 7, 100),
                source.planned("half.weight", "made", torch.float32)]

    write_safetensors(tmp_path / "direct.safetensors", plan(), {"note": "x"})
    monkeypatch.setattr(direct_io, "DIRECT_FROM_BYTES", 1 << 40)
    write_safetensors(tmp_path / "buffered.safetensors", plan(), {"note": "x"})
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "buffered.safetensors").read_bytes()
    got, want = load_file(str(tmp_path / "direct.safetensors")), tensors()
    assert torch.equal(got["rows"], want["bf16.weight"][7:100])
    assert torch.equal(got["made"], want["half.weight"].float())
    assert all(torch.equal(got[k], want[k]) for k in want if k != "bf16.weight")


def test_views_of_tensors_read_past_the_cache_equal_the_tensors(tmp_path, direct):
    save_file(tensors(), str(tmp_path / "in.safetensors"))
    uncached(tmp_path / "in.safetensors")
    source = open_checkpoint_file(tmp_path / "in.safetensors")
    order = ["big.weight", "half.weight", "ids"]
    views = OrderedViews(source, order)
    try:
        for key in [*order, "bf16.weight"]:  # the last is not in the order: read on its own
            view = views.view(key)
            assert view.dtype == tensors()[key].dtype and torch.equal(view, tensors()[key]), key
    finally:
        views.close()


def test_a_tensor_stored_at_an_odd_offset_is_read_whole_not_viewed_misaligned(tmp_path, direct):
    """Other writers may put a 2-byte tensor after an odd-length one; a view there would be misaligned."""
    want = torch.arange(6, dtype=torch.bfloat16)
    header = json.dumps({"odd": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "bf16": {"dtype": "BF16", "shape": [6], "data_offsets": [3, 15]}}).encode()
    header += b" " * (-len(header) % 8)
    data = bytes([1, 2, 3]) + want.view(torch.uint8).numpy().tobytes()
    (tmp_path / "odd.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + data)
    views = OrderedViews(open_checkpoint_file(tmp_path / "odd.safetensors"), ["odd", "bf16"])
    try:
        assert views.view("odd").tolist() == [1, 2, 3] and torch.equal(views.view("bf16"), want)
    finally:
        views.close()


def test_sha256_past_the_cache_is_hashlibs(tmp_path, direct):
    data = random_file(tmp_path / "model.safetensors", 2 * CHUNK + 3)
    uncached(tmp_path / "model.safetensors")
    assert sha256_of(tmp_path / "model.safetensors") == hashlib.sha256(data).hexdigest()
