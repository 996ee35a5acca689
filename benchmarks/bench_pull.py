"""`adapterzoo pull URL` of a large file from an HTTP server on 127.0.0.1, against what a user would do instead:
`curl -o FILE URL && sha256sum FILE` (target: pull at >= 0.8x their speed, with all six hashes from the stream).

The file is a safetensors file (a header, then --size-mib of random bytes), so AutoV3 has tensor data to hash;
it is made once in the temp dir and served by `python -m http.server` (one process for the whole run, bound
to 127.0.0.1). Rounds alternate the two, each into an empty folder, best of --rounds kept; the page cache is
warm for the served file in both. Also times `download()` alone in this process (the stream: receive, write,
hash), which leaves out Python's and the registry's start-up and the probe of the new file.

    python benchmarks/bench_pull.py [--size-mib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_hashing import WRITE_BYTES, warm

from adapterzoo.zoo.download import download


def bench_file(size_mib: int) -> Path:
    """A safetensors file of one U8 tensor of random bytes, in the temp dir, written once and reused."""
    folder = Path(tempfile.gettempdir()) / "adapterzoo-bench-pull"
    path = folder / f"random-{size_mib}MiB.safetensors"
    size = size_mib << 20
    header = json.dumps({"data": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    if path.exists() and path.stat().st_size == 8 + len(header) + size:
        return path
    folder.mkdir(exist_ok=True)
    part = path.with_suffix(".part")
    with open(part, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
        left = size
        while left:
            fh.write(os.urandom(min(left, WRITE_BYTES)))
            left -= min(left, WRITE_BYTES)
    part.replace(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path) -> tuple[subprocess.Popen, int]:
    """`python -m http.server` on 127.0.0.1 for `folder`, once it answers."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the HTTP server did not start")


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def curl_and_sha256sum(url: str, folder: Path) -> str:
    out = folder / "file.safetensors"
    subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
    return subprocess.run(["sha256sum", str(out)], check=True, capture_output=True, text=True).stdout.split()[0]


def adapterzoo_pull(url: str, folder: Path, home: Path) -> dict:
    env = {**os.environ, "ADAPTERZOO_HOME": str(home)}
    env.pop("ADAPTERZOO_DB", None)
    out = subprocess.run([sys.executable, "-m", "adapterzoo", "pull", url, "--dest", str(folder), "--json"],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)[0]


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    path = bench_file(args.size_mib)
    size = path.stat().st_size
    warm(path)
    server, port = serve(path.parent)
    url = f"http://127.0.0.1:{port}/{path.name}"
    best = {"theirs": math.inf, "pull": math.inf, "download": math.inf}
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            work = Path(tmp)
            for round_ in range(args.rounds):
                seconds, reference = timed(curl_and_sha256sum, url, fresh(work / "curl"))
                best["theirs"] = min(best["theirs"], seconds)
                shutil.rmtree(work / "curl")
                home = fresh(work / f"home{round_}")  # a new registry: this URL's file is new to it
                seconds, pulled = timed(adapterzoo_pull, url, fresh(work / "pull"), home)
                best["pull"] = min(best["pull"], seconds)
                if pulled["status"] != "pulled" or pulled["sha256"] != reference:
                    raise SystemExit(f"pull says {pulled}, sha256sum says {reference}")
                shutil.rmtree(work / "pull")
                seconds, got = timed(download, url, fresh(work / "download"))
                best["download"] = min(best["download"], seconds)
                hashes = got.hashes.to_json()
                if hashes["sha256"] != reference or not all(hashes.values()):
                    raise SystemExit(f"download() gave {hashes}; sha256sum says {reference}")
                shutil.rmtree(work / "download")
    finally:
        server.kill()
        server.wait()

    def rate(seconds: float) -> float:
        return size / seconds / 1e6

    print(f"{size / 1e6:.0f} MB safetensors file over http://127.0.0.1 (python -m http.server), best of {args.rounds}")
    print(f"curl -o + sha256sum                        {best['theirs']:6.2f} s {rate(best['theirs']):7.0f} MB/s")
    print(f"adapterzoo pull (whole process, 6 hashes)  {best['pull']:6.2f} s {rate(best['pull']):7.0f} MB/s  "
          f"ratio {best['theirs'] / best['pull']:.2f} (target >= 0.8)")
    print(f"download() in-process (stream + 6 hashes)  {best['download']:6.2f} s {rate(best['download']):7.0f} MB/s  "
          f"ratio {best['theirs'] / best['download']:.2f}")


if __name__ == "__main__":
    main()
