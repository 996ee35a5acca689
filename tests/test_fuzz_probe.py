"""Fuzz `probe` with mutated safetensors files: every outcome is a probe result or our one-line BadFileError.

Seeds are the real LoRAs in tests/fixtures/real/ and a few cheap factory cases (LyCORIS, embedding,
sparse VAE and Flux checkpoints), whole and cut down to 16 tensors; tests/mutations.py mutates them
with a seeded generator. Anything else escaping `probe` (SafetensorError, KeyError, RuntimeError, ...)
is a traceback a user would see.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import factory
import pytest
from mutations import Seed, mutate, read_seed, trimmed, write

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.probe import probe

REAL = Path(__file__).parent / "fixtures" / "real"
FACTORY_SEEDS = ("lycoris-lokr", "lycoris-ia3", "lycoris-full", "embedding-kohya-sd1", "vae-ldm",
                 "ckpt-flux-dev", "unknown-safetensors")
CASES_PER_FULL_SEED = 40  # whole files, headers of up to 85 KB
CASES_PER_TRIMMED_SEED = 300
RANDOM_SEED = 8_4_2026


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[tuple[Seed, int]]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    paths = sorted(REAL.glob("*.safetensors")) + [factory.build(name, root).path for name in FACTORY_SEEDS]
    full = [read_seed(path) for path in paths]
    return [(seed, CASES_PER_FULL_SEED) for seed in full] + [(trimmed(seed), CASES_PER_TRIMMED_SEED) for seed in full]


def test_probe_survives_mutated_safetensors(seeds, tmp_path):
    rng = random.Random(RANDOM_SEED)
    path = tmp_path / "case.safetensors"
    escaped: list[str] = []
    outcomes = {"probed": 0, "refused": 0}
    started = time.perf_counter()
    for seed, cases in seeds:
        for i in range(cases):
            how, head, data = mutate(seed, rng)
            write(path, head, data)
            try:
                assert isinstance(probe(path), ProbeResult)
                outcomes["probed"] += 1
            except BadFileError as exc:
                assert "\n" not in str(exc) and str(exc), f"{seed.name} #{i} ({how}): {exc!r}"
                outcomes["refused"] += 1
            except Exception as exc:  # noqa: BLE001 -- collecting exactly what must never escape
                escaped.append(f"{seed.name} #{i} ({how}): {type(exc).__name__}: {str(exc)[:160]}")
    seconds = time.perf_counter() - started
    total = sum(cases for _, cases in seeds)
    print(f"{total} cases in {seconds:.1f} s: {outcomes}, {len(escaped)} escaped")
    assert not escaped, f"{len(escaped)} of {total} cases escaped probe:\n" + "\n".join(escaped[:25])
    assert outcomes["probed"] > total // 20 and outcomes["refused"] > total // 2  # the mutations reach both ends
