"""hash_file (six hashes, one read pass) against coreutils `sha256sum` alone on the same cached file.

The file (random bytes) is made once in the temp dir and reused; it is read once to warm the page
cache, then the two are timed alternately, best of 3 each, so background load hits both alike.
For reference it also times hashlib.sha256 alone in this process (OpenSSL, SHA-NI where the CPU
has it), which can be much faster than a sha256sum built without those instructions.

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

from adapterzoo.zoo.hashing import hash_file

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


def sha256sum(path: Path) -> str:
    out = subprocess.run(["sha256sum", str(path)], check=True, capture_output=True, text=True).stdout
    return out.split()[0]


def hashlib_sha256(path: Path) -> str:
    with open(path, "rb", buffering=0) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def timed(fn: Callable[[], object], timings: list[float]) -> object:
    """Call fn, append its wall time to timings, return its result."""
    start = time.perf_counter()
    result = fn()
    timings.append(time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    path = bench_file(args.size_mib)
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as fh:
        while fh.read(WRITE_BYTES):
            pass

    ours: list[float] = []
    theirs: list[float] = []
    alone: list[float] = []
    for _ in range(args.runs):
        reference = timed(lambda: sha256sum(path), theirs)
        hashes = timed(lambda: hash_file(path, data_offset=8), ours)
        timed(lambda: hashlib_sha256(path), alone)
        if hashes.sha256 != reference:
            raise SystemExit(f"hash_file says {hashes.sha256}, sha256sum says {reference}")

    def rate(timings: list[float]) -> float:
        return size / min(timings) / 1e6

    print(f"file: {path} ({size / 1e6:.0f} MB, page cache warm), best of {args.runs}")
    print(f"sha256sum                       {rate(theirs):8.0f} MB/s")
    print(f"hash_file (6 hashes, 4 digests) {rate(ours):8.0f} MB/s")
    print(f"ratio hash_file / sha256sum     {rate(ours) / rate(theirs):8.2f}")
    print(f"reference: hashlib.sha256 alone {rate(alone):8.0f} MB/s "
          f"(hash_file at {rate(ours) / rate(alone):.2f} of it)")


if __name__ == "__main__":
    main()
