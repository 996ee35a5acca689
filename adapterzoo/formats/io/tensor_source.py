"""Read the tensors of a checkpoint lazily: every shape and dtype up front, the data one tensor at a time.

A safetensors tensor is read from its byte range into memory of its own (or a buffer the caller
reuses), not through a memory map: a mapping's pages count in the process's RSS until it is closed,
so a streamed multi-GB read would look as large as the file. Its bytes can also be handed to the
writer to copy as they are. Pickles go through the safe unpickler (zip pickles are memory-mapped by
torch, so their tensors are not all read up front).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.direct_io import ReadAhead
from adapterzoo.formats.io.pickle_safe import (
    PICKLE_SUFFIXES,
    load_pickle,
    unwrap_state_dict,
)
from adapterzoo.formats.io.safetensors_header import SafetensorsHeader, read_header
from adapterzoo.formats.io.safetensors_writer import SAFETENSORS_DTYPES, TORCH_DTYPES, PlannedTensor, StoredBytes
from adapterzoo.formats.io.tensor_table import TensorMeta, TensorTable


@dataclass(frozen=True)
class _SafetensorsFile:
    """Tensors of one safetensors file, each read from its byte range when asked for."""

    path: Path
    header: SafetensorsHeader

    def stored(self, key: str) -> StoredBytes:
        info = self.header.tensors[key]
        return StoredBytes(self.path, self.header.data_offset + info.begin, info.end - info.begin)

    def read(self, key: str, out: torch.Tensor | None) -> torch.Tensor:
        info, stored = self.header.tensors[key], self.stored(key)
        tensor = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype]) if out is None else out
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(stored.offset)
            while view:
                got = fh.readinto(view)
                if not got:
                    raise BadFileError(f"{self.path.name} ends inside tensor {key}; was it changed while being read?")
                view = view[got:]
        return tensor


@dataclass
class TensorSource:
    """Tensors by name with their shapes and dtypes; `extras` keeps a pickle's non-tensor top-level values."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    _readers: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor; with `out` (contiguous, its stored shape and dtype), read into that memory instead."""
        if out is not None and (tuple(out.shape) != self.shapes[key] or out.dtype != self.dtypes[key]
                                or not out.is_contiguous()):
            raise ValueError(f"out for {key} must be contiguous {self.dtypes[key]} {list(self.shapes[key])}")
        reader = self._readers[key]
        if isinstance(reader, _SafetensorsFile):
            return reader.read(key, out)
        return reader[key] if out is None else out.copy_(reader[key])

    def stored(self, key: str) -> StoredBytes | None:
        """Where the tensor's bytes lie in a safetensors file; None for a pickle's tensors."""
        reader = self._readers[key]
        return reader.stored(key) if isinstance(reader, _SafetensorsFile) else None

    def output_dtype(self, key: str, dtype: torch.dtype | None) -> torch.dtype:
        """`dtype` for floating tensors when given; integer tensors (position ids) keep theirs."""
        source_dtype = self.dtypes[key]
        return dtype if dtype is not None and source_dtype.is_floating_point else source_dtype

    def planned(
        self,
        key: str,
        name: str,
        dtype: torch.dtype | None,
        shape: tuple[int, ...] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> PlannedTensor:
        """Plan `key` as output tensor `name`; floating tensors are cast to `dtype` when one is given.
        A safetensors tensor kept as it is (no transform, no cast) is copied as bytes."""
        out, shape = self.output_dtype(key, dtype), shape or self.shapes[key]
        stored = self.stored(key)
        if transform is None and out == self.dtypes[key] and stored is not None:
            return PlannedTensor(name, shape, out, stored=stored)
        if transform is None:
            return PlannedTensor(name, shape, out, lambda: self.get(key))
        return PlannedTensor(name, shape, out, lambda: transform(self.get(key)))

    def planned_rows(self, key: str, name: str, dtype: torch.dtype | None, start: int, stop: int) -> PlannedTensor:
        """Rows [start, stop) of `key` as output tensor `name`. A row block of a stored tensor is one byte
        range, so kept as stored it is copied as bytes, never read whole."""
        shape = (stop - start, *self.shapes[key][1:])
        stored, out = self.stored(key), self.output_dtype(key, dtype)
        if stored is None or out != self.dtypes[key]:
            return self.planned(key, name, dtype, shape, lambda t: t[start:stop])
        row = stored.nbytes // self.shapes[key][0]
        return PlannedTensor(name, shape, out, stored=StoredBytes(stored.path, stored.offset + start * row,
                                                                  (stop - start) * row))

    def table(self) -> TensorTable:
        """Shapes and dtypes as probe reads them (safetensors dtype names)."""
        return {k: TensorMeta(shape, SAFETENSORS_DTYPES.get(self.dtypes[k], "?")) for k, shape in self.shapes.items()}

    def update(self, other: TensorSource) -> None:
        """Add another file's tensors (shards of one model)."""
        for key in other.shapes:
            if key in self.shapes:
                raise BadFileError(f"tensor {key} appears in two weight files")
        self.shapes.update(other.shapes)
        self.dtypes.update(other.dtypes)
        self._readers.update(other._readers)


class OrderedViews:
    """Tensors asked for in a known order, each read by a thread one tensor ahead of the caller
    (`direct_io.ReadAhead`) and handed over without a copy: a merge's arithmetic on one tensor overlaps the disk
    reading the next."""

    def __init__(self, source: TensorSource, keys: list[str]) -> None:
        self._source = source
        self._ahead_keys = [key for key in keys if _viewable(source, key)]
        self._position = 0
        self._ahead: ReadAhead | None = None

    def view(self, key: str) -> torch.Tensor:
        """The tensor, read-only and valid until the next call; keys come in the order given (one that cannot be
        viewed, a pickle's or a misaligned one, is read on its own)."""
        if key not in self._ahead_keys[self._position:self._position + 1]:
            return self._source.get(key)
        if self._ahead is None:
            stored = [self._source.stored(k) for k in self._ahead_keys]
            self._ahead = ReadAhead([(s.path, s.offset, s.nbytes) for s in stored])
        self._position += 1
        data = self._ahead.next()
        return torch.frombuffer(data, dtype=self._source.dtypes[key]).view(self._source.shapes[key])

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()


def _viewable(source: TensorSource, key: str) -> bool:
    """Whether `key`'s bytes can be viewed where they are read: a safetensors tensor, not empty, aligned for its
    dtype (other writers may put a 2-byte tensor after an odd-length one)."""
    stored = source.stored(key)
    return stored is not None and stored.nbytes > 0 and stored.offset % source.dtypes[key].itemsize == 0


def _safetensors_source(path: Path) -> TensorSource:
    header = read_header(path)
    unknown = sorted({info.dtype for info in header.tensors.values()} - set(TORCH_DTYPES))
    if unknown:
        raise BadFileError(f"{path.name} holds {', '.join(unknown)} tensors, which we do not read")
    handle = _SafetensorsFile(path, header)
    return TensorSource(
        shapes={k: info.shape for k, info in header.tensors.items()},
        dtypes={k: TORCH_DTYPES[info.dtype] for k, info in header.tensors.items()},
        metadata=dict(header.metadata),
        _readers=dict.fromkeys(header.tensors, handle),
    )


def _pickle_source(path: Path) -> TensorSource:
    obj = load_pickle(path)
    state = unwrap_state_dict(obj)
    if not isinstance(state, dict):
        raise BadFileError(f"{path.name} holds a {type(state).__name__}, not a state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    extras = {str(k): v for k, v in obj.items() if not isinstance(v, (torch.Tensor, dict))} if obj is not state else {}
    return TensorSource(
        shapes={k: tuple(v.shape) for k, v in tensors.items()},
        dtypes={k: v.dtype for k, v in tensors.items()},
        extras=extras,
        _readers=dict.fromkeys(tensors, tensors),
    )


def open_checkpoint_file(path: str | os.PathLike) -> TensorSource:
    """A single-file checkpoint: `.safetensors` by header, `.ckpt/.pt/.pth/.bin` through the safe unpickler."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _pickle_source(path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    if head == b"PK" or head[:1] == b"\x80":
        return _pickle_source(path)
    return _safetensors_source(path)


def open_component(folder: Path, stem: str) -> TensorSource:
    """Weights of one diffusers component folder: single file, shards with an index, a variant, or legacy .bin."""
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise BadFileError(f"{index} is not a readable shard index ({exc.__class__.__name__})") from None
        source = TensorSource()
        for shard in shards:
            source.update(_safetensors_source(folder / shard))
        return source
    candidates = [folder / f"{stem}.safetensors"]
    candidates += sorted(p for p in folder.glob(f"{stem}.*.safetensors") if ".index" not in p.name)
    candidates.append(folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"))  # transformers' legacy name
    for candidate in candidates:
        if candidate.is_file():
            return open_checkpoint_file(candidate)
    raise BadFileError(f"no {stem}.safetensors (or .bin) weights in {folder}")
