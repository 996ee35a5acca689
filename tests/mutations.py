"""Seeded mutations of safetensors files, for fuzzing everything that reads them (tests/test_fuzz_probe.py,
tests/test_bad_input_cli.py).

A seed is a file's header and data; `mutate` makes one case from it: JSON values of the wrong type,
offsets negative, overlapping or huge, shapes and dtypes that do or do not agree with the bytes,
`__metadata__` of the wrong type, JSON that Python reads but safetensors does not, then flipped,
inserted and cut bytes.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterzoo.formats.io.safetensors_header import DTYPE_BITS

SPARSE_ABOVE = 64 << 20  # seeds larger than this keep their data section as a length: written as a hole

WEIRD: list[Any] = [[], {}, "", "x", "F32", -1, 0, 1, 7, 2**31, 2**63, 2**64, 2**64 + 8, 10**30, 1.5, -0.0, True,
                    False, None, [[]], [1, 2], [-1, 2], [2, 1], ["F32"], {"a": 1}, {"dtype": "F32"}, [None]]
HUGE_NUMBER, DEEP_LIST = "<5000-digit number>", "<lists nested 5000 deep>"  # stand-ins, spelled out on writing
DTYPES = [*DTYPE_BITS, "f32", "F17", "", "C128", "STR", "F8_E4M3FN", "Q4"]


@dataclass
class Seed:
    name: str
    header_json: bytes  # parsed afresh for every case: much faster than a deep copy
    data: bytes | int  # the data section, or its length when the file is written sparse (all zeros)

    def data_len(self) -> int:
        return self.data if isinstance(self.data, int) else len(self.data)


def read_seed(path: Path) -> Seed:
    raw = path.read_bytes() if path.stat().st_size <= SPARSE_ABOVE else None
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header_json = fh.read(n)
    start = 8 + n
    data: bytes | int = raw[start:] if raw is not None else path.stat().st_size - start
    return Seed(path.name, header_json, data)


def trimmed(seed: Seed, keep: int = 16) -> Seed:
    """The seed cut down to its first `keep` tensors by name (a LoRA module's parts stay together) with their
    data: a small header probes in a millisecond, so most cases can mutate these."""
    header = json.loads(seed.header_json)
    kept: dict[str, Any] = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(k for k in header if k != "__metadata__")[:keep]:
        entry = dict(header[name])
        begin, end = entry["data_offsets"]
        if not isinstance(seed.data, int):
            chunks.append(seed.data[begin:end])
        entry["data_offsets"] = [offset, offset + end - begin]
        offset += end - begin
        kept[name] = entry
    data = offset if isinstance(seed.data, int) else b"".join(chunks)
    return Seed(f"{seed.name} (first {keep} tensors)", json.dumps(kept).encode(), data)


def write(path: Path, head: bytes, data: bytes | int) -> None:
    """A new file each time: rewriting one in place makes ext4 flush it to disk (auto_da_alloc), 100x slower."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as fh:
        fh.write(head)
        if isinstance(data, int):
            fh.truncate(len(head) + max(data, 0))
        else:
            fh.write(data)


def serialise(header: Any, rng: random.Random) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw = raw.replace(b'"%s"' % HUGE_NUMBER.encode(), b"9" * 5000)  # json.dumps cannot write these two
    raw = raw.replace(b'"%s"' % DEEP_LIST.encode(), b"[" * 5000 + b"]" * 5000)
    return raw + b" " * (-len(raw) % 8 if rng.random() < 0.7 else rng.randrange(3))


def prefixed(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


# -- mutations of the parsed header ------------------------------------------------------------------


def _tensor_names(header: dict) -> list[str]:
    return [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]


def _well_formed(entry: dict) -> bool:
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (isinstance(shape, list) and all(type(d) is int for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets))


def _entry(header: dict, rng: random.Random) -> dict | None:
    """A tensor entry that earlier mutations left intact, to mutate further."""
    names = _tensor_names(header)
    for name in rng.sample(names, min(len(names), 8)):
        if _well_formed(header[name]):
            return header[name]
    return None


def retype_field(header: dict, rng: random.Random) -> None:
    if (entry := _entry(header, rng)) is not None:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = copy.deepcopy(rng.choice(WEIRD))


def retype_element(header: dict, rng: random.Random) -> None:
    entry = _entry(header, rng)
    values = entry.get(rng.choice(["shape", "data_offsets"])) if entry is not None else None
    if values:
        values[rng.randrange(len(values))] = copy.deepcopy(rng.choice(WEIRD))


def retype_entry(header: dict, rng: random.Random) -> None:
    names = _tensor_names(header)
    if names:
        header[rng.choice(names)] = copy.deepcopy(rng.choice(WEIRD))


def bad_offsets(header: dict, rng: random.Random) -> None:
    entry = _entry(header, rng)
    if entry is None:
        return
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = rng.choice([
        [end, begin], [begin - 1, end - 1], [max(begin - 4, 0), end], [begin, end + 4], [-8, end], [begin, -1],
        [begin, 2**64 - 1], [2**64, 2**64 + end - begin], [begin, begin], [0, end - begin], [begin], [begin, end, end],
    ])


def bad_shape(header: dict, rng: random.Random) -> None:
    entry = _entry(header, rng)
    if entry is None:
        return
    shape = list(entry["shape"])
    entry["shape"] = rng.choice([
        [-d for d in shape], shape + [1], shape[:-1], [2**32, 2**32], [2**64], [2**63, 2], [True] * len(shape),
        [float(d) for d in shape], [0], [], [str(d) for d in shape], [d * 2 for d in shape], [2**62, 4], [2**63, 2, 0],
    ])


def bad_dtype(header: dict, rng: random.Random) -> None:
    if (entry := _entry(header, rng)) is not None:
        entry["dtype"] = rng.choice(DTYPES)


def bad_metadata(header: dict, rng: random.Random) -> None:
    meta = header.get("__metadata__")
    roll = rng.random()
    if isinstance(meta, dict) and meta and roll < 0.4:
        meta[rng.choice(list(meta))] = copy.deepcopy(rng.choice(WEIRD))
    elif isinstance(meta, dict) and roll < 0.6:  # JSON inside a metadata string, of the wrong shape
        value = rng.choice([*WEIRD, *({key: w} for key in ("lora_alpha", "unet.lora_alpha") for w in WEIRD)])
        meta[rng.choice(["lora_adapter_metadata", "ss_network_args", "unet", "text_encoder"])] = json.dumps(value)
    else:
        header["__metadata__"] = copy.deepcopy(rng.choice(WEIRD + [{"a": {"b": "c"}}, {"a": ["b"]}, {"": ""}]))


def drop_field(header: dict, rng: random.Random) -> None:
    if (entry := _entry(header, rng)) is not None:
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        if rng.random() < 0.3:
            entry["extra"] = rng.choice(WEIRD)


def rename_key(header: dict, rng: random.Random) -> None:
    names = _tensor_names(header)
    if names:
        old = rng.choice(names)
        new = rng.choice(["", "__metadata__", old.replace(".", "_"), old.split(".")[0], old + ".alpha", "alpha",
                          old.replace("lora_", ""), old + "\ud800", "\udc00" + old])
        header[new] = header.pop(old)


def odd_json(header: dict, rng: random.Random) -> None:
    """Values Python's json reads but JSON (and safetensors) does not, or that Python itself chokes on."""
    if (entry := _entry(header, rng)) is not None:
        entry["extra"] = rng.choice([math.nan, math.inf, "\ud83d", HUGE_NUMBER, DEEP_LIST])


MUTATIONS: list[Callable[[dict, random.Random], None]] = [
    retype_field, retype_element, retype_entry, bad_offsets, bad_shape, bad_dtype, bad_metadata, drop_field, rename_key,
    odd_json,
]


def relayout(header: dict, rng: random.Random) -> tuple[dict, int]:
    """Change shapes/dtypes of a few tensors, then recompute every offset so the file is valid safetensors:
    the weird content reaches the recognisers instead of the validator."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    for name in rng.sample(sorted(tensors), min(len(tensors), rng.randint(1, 3))):
        entry = tensors[name]
        change = rng.randrange(4)
        if change == 0:
            entry["dtype"] = rng.choice(list(DTYPE_BITS))
        elif change == 1:
            entry["shape"] = rng.choice([[], [0], [2], [1, 1], [3, 1, 1, 1], [2, 2, 2, 2, 2], entry["shape"][::-1]])
        elif change == 2:
            entry["shape"] = [d + 1 for d in entry["shape"]][:4]
        else:
            entry["shape"] = [0, *entry["shape"]]
    offset = 0
    for entry in tensors.values():
        nbytes = math.prod(entry["shape"]) * DTYPE_BITS[entry["dtype"]] // 8
        entry["data_offsets"] = [offset, offset + nbytes]
        offset += nbytes
    return header, offset


# -- one mutated file ---------------------------------------------------------------------------------


def mutate(seed: Seed, rng: random.Random) -> tuple[str, bytes, bytes | int]:
    """(what was done, header bytes with prefix, data section) of one case."""
    header = json.loads(seed.header_json)
    data: bytes | int = seed.data
    how = rng.random()
    if how < 0.45:
        done = [rng.choice(MUTATIONS) for _ in range(rng.randint(1, 3))]
        for mutation in done:
            mutation(header, rng)
        return "+".join(m.__name__ for m in done), prefixed(serialise(header, rng)), data
    if how < 0.55:
        header, length = relayout(header, rng)
        return "relayout", prefixed(serialise(header, rng)), length if isinstance(data, int) else bytes(length)
    if how < 0.6:
        whole = rng.choice([[], "x", 1, None, [header], {"__metadata__": header.get("__metadata__")}])
        return "top-level", prefixed(serialise(whole, rng)), data
    head = bytearray(prefixed(serialise(header, rng)))
    if how < 0.65:
        head[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(head), len(head) - 9, 2**63, 100_000_001]))
        return "header length", bytes(head), data
    if how < 0.85:  # flipped bits, mostly inside the header where they matter
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(head))
            head[i] ^= 1 << rng.randrange(8)
        return "flipped bits", bytes(head), data
    if how < 0.92:  # bytes inserted into or deleted from the header
        i = rng.randrange(8, len(head))
        if rng.random() < 0.5:
            head[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            del head[i:i + rng.randint(1, 4)]
        return "spliced header", bytes(head), data
    cut = rng.randrange(len(head) + seed.data_len())  # cut anywhere: inside the header or the data
    if cut < len(head):
        return f"cut at {cut}", bytes(head[:cut]), b""
    return f"cut at {cut}", bytes(head), cut - len(head) if isinstance(data, int) else data[: cut - len(head)]
