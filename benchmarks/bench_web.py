"""`adapterzoo serve` on a registry of 20,000 files: server time of the library page (first render and each
filter, sort and page change) and of one /api/files page, median of --runs requests each, in-process through
FastAPI's TestClient (no network in the way), timed around the app itself. Targets (issue 16): page ≤ 150 ms, API page ≤ 50 ms.

The baseline, in the same run on the same rows: the registry without the indexes registry.db.sql adds for
these queries (sort by size / newest / name, latest verification per file, files by source), printed as ratios.

    python benchmarks/bench_web.py [--files 20000] [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

PAGES = ["/", "/?kind=lora", "/?base=sdxl", "/?verdict=fail", "/?verdict=never", "/?status=broken",
         "/?source=civitai", "/?q=knight", "/?kind=lora&base=sd1&sort=size", "/?sort=newest", "/?sort=verdict",
         "/?view=list", "/?page=200"]
API = ["/api/files", "/api/files?sort=size&page=100", "/api/files?q=knight&base=sdxl"]
INDEXES = ["ix_files_size", "ix_files_first_seen", "ix_verifications_file_id_id", "ix_sources_provider_file_id",
           "ix_locations_host_name_key"]
KINDS = ["lora"] * 12 + ["lycoris"] * 3 + ["checkpoint", "embedding", "embedding", "vae", "hypernetwork"]
BASES = ["sd1"] * 4 + ["sdxl"] * 4 + ["flux", "flux", "sd2", "unknown"]
WORDS = ["knight", "castle", "anime", "portrait", "detail", "style", "pixel", "ink", "neon", "forest", "robot"]


def make_registry(path: Path, files: int, seed: int = 0) -> str:
    """An SQLite registry with `files` files (one in twenty with a second copy), a third with a Civitai source,
    half verified (some twice)."""
    from sqlalchemy import insert

    from adapterzoo.zoo.db import connect
    from adapterzoo.zoo.hosts import current_host
    from adapterzoo.zoo.models import FileEntry, Location, Source, Verification

    url = f"sqlite:///{path}"
    engine = connect(url)
    rng = random.Random(seed)
    start = datetime(2024, 1, 1)
    host = current_host()
    rows, places, sources, checks = [], [], [], []
    for i in range(1, files + 1):
        kind, base = rng.choice(KINDS), rng.choice(BASES)
        words = rng.sample(WORDS, 3)
        tags = {f"{rng.randint(1, 20)}_{words[0]}": {w: rng.randint(1, 90) for w in words}}
        digest = f"{rng.getrandbits(256):064x}"
        path = (f"/models/{rng.choice(['a1111/models/Lora', 'comfy/models/loras'])}/{words[0]}-{i}"
                f"-{words[1]}.safetensors")
        size, missing = rng.randint(1 << 20, 7 << 30), rng.random() < 0.02
        rows.append({
            "id": i, "is_folder": False, "size": size, "sha256": digest,
            "autov1": digest[:8], "autov2": digest[:10], "autov3": digest[-12:], "blake3": digest[::-1], "crc32": digest[:8],
            "kind": kind, "base": base, "format": "kohya" if kind in ("lora", "lycoris") else None,
            "rank": rng.choice([4, 8, 16, 32, 64, 128]) if kind in ("lora", "lycoris") else None, "alpha": 8.0,
            "dtype": "fp16", "tensors": rng.randint(100, 2000),
            "metadata": {"ss_tag_frequency": json.dumps(tags), "ss_output_name": words[0]},
            "details": {"modules": 192}, "warnings": [], "trigger_words": words,
            "error": "file is truncated" if rng.random() < 0.01 else None, "unsafe": False,
            "first_seen": start + timedelta(minutes=i), "last_seen": start,
        })
        copies = [path] + ([path.replace("/models/", "/backup/", 1)] if rng.random() < 0.05 else [])
        places.extend({"file_id": i, "host": host, "path": where, "size": size, "mtime_ns": i, "inode": None,
                       "device": None, "root_id": None, "preview_path": None, "missing": missing,
                       "missing_since": start if missing else None, "first_seen": start, "last_seen": start}
                      for where in copies)
        if rng.random() < 0.33:
            sources.append({"file_id": i, "provider": "civitai", "civitai_model_id": 1000 + i,
                            "civitai_version_id": 5000 + i, "model_name": f"{words[1].title()} {words[2]}",
                            "version_name": "v1.0", "trained_words": [words[0]], "created": start})
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            checks.append({"file_id": i, "checkpoint": "/ck.safetensors", "verdict": rng.choice(["pass", "fail"]),
                           "created": start, "reasons": [], "effects": [], "parameters": {}})
    with engine.begin() as connection:
        for table, values in ((FileEntry, rows), (Location, places), (Source, sources), (Verification, checks)):
            for chunk in range(0, len(values), 2000):
                connection.execute(insert(table.__table__), values[chunk:chunk + 2000])
    engine.dispose()
    return url


class ServerTime:
    """ASGI wrapper timing the app from the request's arrival to its last byte: the server's time, without
    the test client's own (it runs the app in another thread)."""

    def __init__(self, app) -> None:
        self.app, self.last_ms = app, 0.0

    async def __call__(self, scope, receive, send) -> None:
        begin = time.perf_counter()
        await self.app(scope, receive, send)
        self.last_ms = (time.perf_counter() - begin) * 1000


def timings(client, timer: ServerTime, paths: list[str], runs: int) -> dict[str, float]:
    """path -> median server milliseconds of `runs` requests (after one warm-up)."""
    medians = {}
    for path in paths:
        answer = client.get(path)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])
        spent = []
        for _ in range(runs):
            client.get(path)
            spent.append(timer.last_ms)
        medians[path] = statistics.median(spent)
    return medians


def measure(engine, runs: int) -> tuple[dict[str, float], dict[str, float]]:
    """Page and API medians of the app on `engine` (as `adapterzoo serve` builds it)."""
    from fastapi.testclient import TestClient

    from adapterzoo.web.actions import Context
    from adapterzoo.web.app import create_app
    from adapterzoo.web.security import Guard
    from adapterzoo.zoo.db import home_folder

    home = home_folder()
    app = create_app(engine, Context(engine, str(engine.url), home / "library", "a1111", home),
                     Guard("127.0.0.1", 7377))
    timer = ServerTime(app)
    client = TestClient(timer, base_url="http://127.0.0.1:7377")
    return timings(client, timer, PAGES + ["/api/session"], runs), timings(client, timer, API, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    os.environ.setdefault("ADAPTERZOO_HOME", tempfile.mkdtemp(prefix="bench-web-home-"))
    with tempfile.TemporaryDirectory(prefix="bench-web-") as folder:
        started = time.perf_counter()
        url = make_registry(Path(folder) / "registry.db", args.files)
        print(f"registry of {args.files} files made in {time.perf_counter() - started:.1f} s")
        from sqlalchemy import create_engine

        from adapterzoo.zoo.db import connect

        pages, api = measure(connect(url), args.runs)
        bare = create_engine(url)  # not connect(): it would add the indexes back
        with bare.begin() as connection:
            for name in INDEXES:
                connection.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
        base_pages, base_api = measure(bare, args.runs)

    print(f"\n{'request':42} {'ms (median)':>12} {'no new indexes':>15} {'ratio':>7}  target")
    for label, measured, baseline, target in (("page", pages, base_pages, 150), ("api", api, base_api, 50)):
        for path, ms in measured.items():
            if path == "/api/session":
                continue
            verdict = "ok" if ms <= target else "OVER"
            print(f"{path:42} {ms:12.1f} {baseline[path]:15.1f} {baseline[path] / ms:6.1f}x  ≤ {target} {verdict}")
    calm = pages.pop("/api/session")
    print(f"\n(an almost empty answer, GET /api/session, takes {calm:.1f} ms here: the machine's own pace; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"library page: median of medians {statistics.median(pages.values()):.1f} ms, worst "
          f"{max(pages.values()):.1f} ms; /api/files: worst {max(api.values()):.1f} ms")


if __name__ == "__main__":
    main()
