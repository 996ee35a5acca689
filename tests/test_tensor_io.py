"""Streaming tensors between safetensors files: kept tensors travel as bytes (copied by the kernel, or through
a buffer where it cannot), reads go into the caller's memory, and a file cut short is named, never misread."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.safetensors_header import read_header
from adapterzoo.formats.io.safetensors_writer import write_safetensors
from adapterzoo.formats.io.tensor_source import open_checkpoint_file


def source_file(path: Path) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "conv.weight": torch.randn(8, 4, 3, 3, generator=generator).half(),
        "linear.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
        "fp32.bias": torch.randn(16, generator=generator),
        "position_ids": torch.arange(77, dtype=torch.int64)[None],
        "mask": torch.rand(5, generator=generator) > 0.5,
        "scalar": torch.tensor(0.25),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, str(path), {"note": "kept"})
    return tensors


def copy_plan(source_path: Path, dtype: torch.dtype | None = None) -> list:
    source = open_checkpoint_file(source_path)
    return [source.planned(key, key, dtype) for key in source.shapes]


def assert_same(path: Path, want: dict[str, torch.Tensor]) -> None:
    got = load_file(str(path))
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


def test_kept_tensors_are_copied_as_bytes_without_being_decoded(tmp_path, monkeypatch):
    want = source_file(tmp_path / "in.safetensors")
    plan = copy_plan(tmp_path / "in.safetensors")
    assert all(item.stored is not None and item.make is None for item in plan)
    monkeypatch.setattr(torch.Tensor, "numpy", lambda self: pytest.fail("a kept tensor was decoded"))
    write_safetensors(tmp_path / "out.safetensors", plan)
    monkeypatch.undo()
    assert_same(tmp_path / "out.safetensors", want)


def test_a_cast_is_decoded_and_only_floating_tensors_change(tmp_path):
    want = source_file(tmp_path / "in.safetensors")
    plan = copy_plan(tmp_path / "in.safetensors", torch.float16)
    kept = {item.name for item in plan if item.stored is not None}
    assert kept == {"conv.weight", "position_ids", "mask"}  # already fp16, or not floating
    write_safetensors(tmp_path / "out.safetensors", plan)
    assert_same(tmp_path / "out.safetensors",
                {k: v.half() if v.is_floating_point() else v for k, v in want.items()})


def refuse(code: int):
    def copy_file_range(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return copy_file_range


@pytest.mark.parametrize("kernel", ["other filesystem", "no such call"])
def test_where_the_kernel_cannot_copy_the_bytes_go_through_a_buffer(tmp_path, monkeypatch, kernel):
    want = source_file(tmp_path / "in.safetensors")
    if kernel == "other filesystem":
        monkeypatch.setattr(os, "copy_file_range", refuse(errno.EXDEV))
    else:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    write_safetensors(tmp_path / "out.safetensors", copy_plan(tmp_path / "in.safetensors"))
    assert_same(tmp_path / "out.safetensors", want)


def test_a_full_disk_while_copying_is_raised_not_worked_around(tmp_path, monkeypatch):
    source_file(tmp_path / "in.safetensors")
    monkeypatch.setattr(os, "copy_file_range", refuse(errno.ENOSPC))
    with pytest.raises(OSError) as raised:
        write_safetensors(tmp_path / "out.safetensors", copy_plan(tmp_path / "in.safetensors"))
    assert raised.value.errno == errno.ENOSPC


@pytest.mark.parametrize("how", ["copied", "read"])
def test_a_source_cut_short_after_its_header_was_read_is_named(tmp_path, how):
    source_file(tmp_path / "in.safetensors")
    source = open_checkpoint_file(tmp_path / "in.safetensors")
    os.truncate(tmp_path / "in.safetensors", os.path.getsize(tmp_path / "in.safetensors") - 64)
    with pytest.raises(BadFileError, match=r"in\.safetensors ends"):
        if how == "copied":
            write_safetensors(tmp_path / "out.safetensors", [source.planned(k, k, None) for k in source.shapes])
        else:
            for key in source.shapes:
                source.get(key)


def test_get_reads_into_the_callers_buffer_of_the_right_shape_only(tmp_path):
    want = source_file(tmp_path / "in.safetensors")
    source = open_checkpoint_file(tmp_path / "in.safetensors")
    buffer = torch.empty(8, 4, 3, 3, dtype=torch.float16)
    got = source.get("conv.weight", out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(buffer, want["conv.weight"])
    with pytest.raises(ValueError, match="conv.weight"):
        source.get("conv.weight", out=torch.empty(8, 4, 3, 3))


def test_progress_counts_every_byte_of_tensor_data_once(tmp_path):
    source_file(tmp_path / "in.safetensors")
    plan = copy_plan(tmp_path / "in.safetensors", torch.float32)  # some copied as bytes, some decoded
    reported: list[int] = []
    write_safetensors(tmp_path / "out.safetensors", plan, progress=reported.append)
    header = read_header(tmp_path / "out.safetensors")
    assert len(reported) == len(plan)
    assert sum(reported) == header.file_size - header.data_offset
