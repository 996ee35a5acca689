"""hash_file (six hashes, one read pass: what `scan` and `pull` run) against hashlib.sha256 alone and coreutils
`sha256sum` alone on the same cached file.

The file (random bytes) is made once in the temp dir and reused; it is read once to warm the page
cache, then they are timed alternately, best of --runs each, so background load hits all alike.
hashlib.sha256 (OpenSSL, SHA-NI where the CPU has it) is the floor for one SHA-256 stream (target:
hash_file at >= 0.8x its speed); sha256sum can be much slower when built without those instructions.

hash_file runs two SHA-256 streams (the file's, and AutoV3's of the tensor data) plus BLAKE3 and CRC32,
one thread each. Their CPU time, each digest alone and together, says what the cores allow: with n free
cores hash_file cannot beat max(its CPU time / n, one SHA-256) whatever the scheduling, and wall time on
a busy machine says little, so both are printed.

    python benchmarks/bench_hashing.py [--size-mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3

from adapterzoo.zoo.hashing import CHUNK_BYTES, _Crc32, hash_file

WRITE_BYTES = 64 << 20


def bench_file(size_mib: int) -> Path:
    """A file of random bytes in the temp dir, written once and reused by later runs."""
    path = Path(tempfile.gettempdir()) / "adapterzoo-bench-hashing" / f"random-{size_mib}MiB.bin"
    if path.exists() and path.stat().st_size == size_mib << 20:
        return path
    path.parent.mkdir(exist_ok=True)
    part = path.with_suffix(".part")
    with open(part, "wb") as fh:
        left = size_mib << 20
        while left:
            fh.write(os.urandom(min(left, WRITE_BYTES)))
            left -= min(left, WRITE_BYTES)
    part.replace(path)
    return path


def warm(path: Path) -> None:
    """Read the file once, so it is in the page cache for every timed run."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(WRITE_BYTES):
            pass


def sha256sum(path: Path) -> str:
    out = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True).stdout
    return out.split()[0]


def hashlib_sha256(path: Path) -> str:
    with open(path, "rb", buffering=0) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def timed(fn: Callable[[], object], timings: list[float], cpu: list[float] | None = None) -> object:
    """Call fn, append its wall time to timings (and its CPU time, all threads, to cpu), return its result."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    timings.append(time.perf_counter() - start)
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    return result


def digest_alone(path: Path, make: Callable[[], object]) -> None:
    """One digest over the file in this thread, read in hash_file's chunks."""
    digest = make()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    path = bench_file(args.size_mib)
    size = path.stat().st_size
    warm(path)

    ours: list[float] = []
    theirs: list[float] = []
    alone: list[float] = []
    cpu = {name: [] for name in ("hash_file", "sha256", "blake3", "crc32")}
    for _ in range(args.runs):
        reference = timed(lambda: sha256sum(path), theirs)
        hashes = timed(lambda: hash_file(path, data_offset=8), ours, cpu["hash_file"])
        timed(lambda: hashlib_sha256(path), alone)
        if hashes.sha256 != reference:
            raise SystemExit(f"hash_file says {hashes.sha256}, sha256sum says {reference}")
        for name, make in (("sha256", hashlib.sha256), ("blake3", blake3.blake3), ("crc32", _Crc32)):
            timed(lambda make=make: digest_alone(path, make), [], cpu[name])

    def rate(timings: list[float]) -> float:
        return size / min(timings) / 1e6

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sha = min(cpu["sha256"])
    floor = max(min(cpu["hash_file"]) / cores, sha)
    print(f"file: {path} ({size / 1e6:.0f} MB, page cache warm), best of {args.runs}; load average "
          f"{os.getloadavg()[0]:.1f}, {cores} usable cores")
    print(f"hashlib.sha256 alone            {rate(alone):8.0f} MB/s")
    print(f"sha256sum                       {rate(theirs):8.0f} MB/s")
    print(f"hash_file (6 hashes, 4 digests) {rate(ours):8.0f} MB/s")
    print(f"ratio hash_file / hashlib       {rate(ours) / rate(alone):8.2f}  (target >= 0.8)")
    print(f"ratio hash_file / sha256sum     {rate(ours) / rate(theirs):8.2f}")
    print("CPU seconds, in units of one SHA-256 stream: " + ", ".join(
        f"{name} {min(times) / sha:.2f}" for name, times in cpu.items()))
    print(f"so with {cores} free cores hash_file can reach at most {sha / floor:.2f} of hashlib's speed")


if __name__ == "__main__":
    main()
