"""Seeded fuzzing of probe on mutated torch pickles: every outcome is a probe result or our one-line error.

Mutations of small real torch files (zip and legacy stream, protocols 2 and 4, a raw pickle):
flipped bytes, cut files, mutated zip directories (end record, zip64 locator, central entries) and
mutated pickle opcodes inside a still-valid container. A Python exception of any other type would
reach a user as a traceback.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable

import pytest
import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.probe import probe

CASES_PER_SEED = 330
OPCODES = sorted({op.code.encode("latin-1")[0] for op in pickletools.opcodes})


def _lora() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"lora_unet_a.lora_down.weight": torch.randn(4, 64, generator=gen),
            "lora_unet_a.lora_up.weight": torch.randn(64, 4, generator=gen), "lora_unet_a.alpha": torch.tensor(4.0)}


def _saved(obj: object, protocol: int, zipped: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def seeds() -> dict[str, bytes]:
    embedding = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.ones(2, 768)}, "name": "e", "step": 3}
    return {
        "zip-p2": _saved({"state_dict": _lora(), "global_step": 5}, 2, True),
        "zip-p4": _saved(_lora(), 4, True),
        "legacy-p2": _saved(embedding, 2, False),
        "legacy-p4": _saved(_lora(), 4, False),
        "raw-p4": pickle.dumps({"a": [1.0, 2.0], "b": "x"}, protocol=4),
        "zip-p5-embedding": _saved(embedding, 5, True),
    }


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def cut(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


def _field(out: bytearray, at: int, size: int, rng: random.Random) -> None:
    if 0 <= at and at + size <= len(out):
        value = rng.choice([0, 1, 2, 0xFF, (1 << 8 * size) - 1, rng.randrange(1 << 8 * size)])
        out[at: at + size] = value.to_bytes(size, "little")


def zip_directory(data: bytes, rng: random.Random) -> bytes:
    """Overwrite one field of the end record, the zip64 locator before it, or a central entry."""
    out = bytearray(data)
    end = data.rfind(b"PK\x05\x06")
    if end < 0:
        return flip_bytes(data, rng)
    entries = [i for i in range(len(data)) if data.startswith(b"PK\x01\x02", i)]
    where = rng.choice(["end", "locator", "entry"])
    if where == "end":
        at, size = rng.choice([(4, 2), (6, 2), (8, 2), (10, 2), (12, 4), (16, 4), (20, 2)])
        _field(out, end + at, size, rng)
    elif where == "locator":  # a zip64 end-of-directory locator: disk numbers, offset
        out[end - 20: end] = b"PK\x06\x07" + struct.pack("<IQI", rng.randrange(3), rng.randrange(len(data)),
                                                         rng.randrange(3))
    elif entries:
        at, size = rng.choice([(10, 2), (20, 4), (24, 4), (28, 2), (30, 2), (34, 2), (42, 4)])
        _field(out, rng.choice(entries) + at, size, rng)
    return bytes(out)


def _mutate_pickle(pkl: bytes, rng: random.Random) -> bytes:
    out = bytearray(pkl)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out))
        action = rng.randrange(3)
        if action == 0:
            out[at] = rng.choice(OPCODES)
        elif action == 1:
            out.insert(at, rng.choice(OPCODES))
        else:
            del out[at]
    return bytes(out)


def pickle_opcodes(data: bytes, rng: random.Random) -> bytes:
    """Mutate the pickle inside an intact container: a zip's data.pkl, a stream's first kilobyte."""
    if not data.startswith(b"PK\x03\x04"):
        head = min(len(data), 1024)
        return _mutate_pickle(data[:head], rng) + data[head:]
    with zipfile.ZipFile(io.BytesIO(data)) as src:
        records = {name: src.read(name) for name in src.namelist()}
    name = next(n for n in records if n.endswith("data.pkl"))
    records[name] = _mutate_pickle(records[name], rng)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for member, content in records.items():
            dst.writestr(member, content)
    return out.getvalue()


MUTATIONS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "flip": flip_bytes, "cut": cut, "zip-directory": zip_directory, "pickle-opcodes": pickle_opcodes,
}


def mutants(seeds: dict[str, bytes]):
    rng = random.Random(20261130)
    for seed_name, data in seeds.items():
        for i in range(CASES_PER_SEED):
            mutation = list(MUTATIONS)[i % len(MUTATIONS)]
            yield f"{seed_name}/{mutation}/{i}", MUTATIONS[mutation](data, rng)


def test_every_mutated_pickle_probes_or_fails_with_our_error(seeds, tmp_path):
    outcomes: dict[str, int] = {"result": 0, "error": 0}
    unexpected: list[str] = []
    path = tmp_path / "fuzzed.pt"
    for name, data in mutants(seeds):
        path.write_bytes(data)
        try:
            assert isinstance(probe(path), ProbeResult)
            outcomes["result"] += 1
        except BadFileError as exc:  # UnsafeFileError is one too
            assert "\n" not in str(exc) and str(exc), name
            outcomes["error"] += 1
        except Exception as exc:  # noqa: BLE001 - the failure being hunted
            unexpected.append(f"{name}: {type(exc).__name__}: {exc}"[:300])
    assert not unexpected, f"{len(unexpected)} not ours:\n" + "\n".join(unexpected[:10])
    assert outcomes["result"] > 50 and outcomes["error"] > 500, outcomes  # both paths really exercised


def test_cli_prints_one_line_on_mutated_pickles(seeds, tmp_path):
    """The console script on a sample: exit 0 with a table or exit 1 with one `error:` line, never a traceback."""
    sample = [data for i, (_, data) in enumerate(mutants(seeds)) if i % 97 == 0]
    paths = []
    for i, data in enumerate(sample):
        paths.append(tmp_path / f"m{i}.pt")
        paths[-1].write_bytes(data)
    script = ("import sys\nfrom adapterzoo.cli import main\nfor p in sys.argv[1:]:\n"
              "    sys.argv = ['adapterzoo', 'probe', p]\n    try:\n        main()\n"
              "    except SystemExit as e:\n        print('EXIT', e.code, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    for line in done.stderr.splitlines():
        assert line.startswith(("error: ", "EXIT 0", "EXIT 1")), line


ODD_OBJECTS = {
    "list": [1, 2],
    "tensor": torch.ones(3),
    "string-to-param-int": {"string_to_param": 5},
    "string-to-param-no-tensor": {"string_to_param": {"*": 5}},
    "hypernetwork-int": {320: 5},
    "int-key-state": {"state_dict": {1: torch.ones(1)}},
    "tuple-key": {(1, 2): torch.ones(1)},
    "alpha-not-scalar": {"lora_unet_a.alpha": torch.ones(3), "lora_unet_a.lora_down.weight": torch.ones(4, 8),
                         "lora_unet_a.lora_up.weight": torch.ones(8, 4)},
    "non-tensor-values": {"lora_unet_a.lora_down.weight": "x", "lora_unet_a.alpha": None},
}


@pytest.mark.parametrize("name", list(ODD_OBJECTS))
def test_odd_objects_in_a_readable_pickle_probe_or_fail_with_our_error(tmp_path, name):
    """What a mutation seldom reaches: a pickle that reads fine but holds the wrong shapes of things."""
    path = tmp_path / f"{name}.pt"
    torch.save(ODD_OBJECTS[name], path)
    try:
        assert isinstance(probe(path), ProbeResult)
    except BadFileError as exc:
        assert str(exc) and "\n" not in str(exc)
