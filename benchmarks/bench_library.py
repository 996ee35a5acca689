"""A library of 20,000 small files and a few large ones, in A1111 and ComfyUI folders (1,000 files in both):
the first scan, an unchanged rescan, a rename of 1,000 files and the large ones, and `dupes` (issue 14 §6).

Baselines from the same run: for the rescan, os.walk + os.stat of the same tree (the least any rescan
does); for the rename, hashing the renamed files (what a registry keyed by path does); for dupes, one SQL
GROUP BY over the registry (the least a duplicate query does). Each is timed in-process (best of --runs)
and, for the commands, as the whole `adapterzoo` process a user runs (Python start-up included). Hashing
and probing are counted through the rename: the target is none.

    python benchmarks/bench_library.py [--files 20000] [--large 3] [--large-mib 512] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text

LORA_KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
FOLDERS = 100  # per UI: 200 files a folder at 20,000 files


def small_lora(index: int) -> bytes:
    """A one-module kohya LoRA (rank 1, fp16: 2.2 KB) whose bytes are its own: the index is in its weights."""
    tensors = {f"{LORA_KEY}.alpha": ("F16", [], 2), f"{LORA_KEY}.lora_down.weight": ("F16", [1, 768], 1536),
               f"{LORA_KEY}.lora_up.weight": ("F16", [320, 1], 640)}
    header, offset = {}, 0
    for name, (dtype, shape, size) in sorted(tensors.items()):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytearray(offset)
    struct.pack_into("<I", data, 4, index)
    return struct.pack("<Q", len(raw)) + raw + bytes(data)


def large_file(path: Path, mib: int, index: int) -> None:
    """A checkpoint-sized safetensors file, zeros but for its first value (sparse on disk; hashing still reads
    every byte)."""
    count = (mib << 20) // 2
    raw = json.dumps({"model.diffusion_model.out.2.weight": {"dtype": "F16", "shape": [count],
                                                            "data_offsets": [0, 2 * count]}}).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw + struct.pack("<H", index + 1))
        fh.truncate(8 + len(raw) + 2 * count)


def build(root: Path, files: int, large: int, large_mib: int) -> dict[str, Path]:
    a1111, comfy = root / "stable-diffusion-webui" / "models" / "Lora", root / "ComfyUI" / "models" / "loras"
    for index in range(files - 1000):
        folder = (a1111 if index % 2 else comfy) / f"set{index % FOLDERS:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"lora{index:05d}.safetensors").write_bytes(small_lora(index))
    shared = _mkdir(comfy / "shared")
    for index in range(1, 2001, 2):  # 1,000 of A1111's files are in ComfyUI's folder too
        source = a1111 / f"set{index % FOLDERS:03d}" / f"lora{index:05d}.safetensors"
        shutil.copy2(source, shared / source.name)
    checkpoints = _mkdir(root / "stable-diffusion-webui" / "models" / "Stable-diffusion")
    for index in range(large):
        large_file(checkpoints / f"checkpoint{index}.safetensors", large_mib, index)
    return {"a1111": root / "stable-diffusion-webui", "comfyui": root / "ComfyUI", "a1111_loras": a1111,
            "checkpoints": checkpoints}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def walk_and_stat(roots: list[Path]) -> int:
    count = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                os.stat(os.path.join(dirpath, name))
                count += 1
    return count


def command(*args: str) -> tuple[float, float]:
    """(wall time, CPU time) of `adapterzoo ARGS` as its own process: on a busy machine the two part."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "adapterzoo", *args], check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def cpu_and_wall(fn: Callable[[], object], runs: int) -> tuple[float, float, object]:
    """(best CPU time, best wall time, last result) of `runs` calls in this process."""
    cpus, walls, result = [], [], None
    for _ in range(runs):
        cpu, wall = time.process_time(), time.perf_counter()
        result = fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return min(cpus), min(walls), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--large", type=int, default=3)
    parser.add_argument("--large-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="Build here (default: a new temp folder, removed after).")
    options = parser.parse_args()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="adapterzoo-bench-library-"))
    if workdir.exists():
        shutil.rmtree(workdir)
    os.environ["ADAPTERZOO_HOME"] = str(workdir / "home")
    os.environ.setdefault("ADAPTERZOO_HOST", "bench")
    try:
        run(workdir, options)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(workdir: Path, options: argparse.Namespace) -> None:
    from adapterzoo.formats import probe as probe_module
    from adapterzoo.zoo import hashing, scan
    from adapterzoo.zoo.db import open_registry
    from adapterzoo.zoo.dupes import find_dupes
    from adapterzoo.zoo.roots import add_root, roots_to_scan

    start = time.perf_counter()
    paths = build(workdir / "lib", options.files, options.large, options.large_mib)
    print(f"built {options.files} small files and {options.large} x {options.large_mib} MiB in "
          f"{time.perf_counter() - start:.1f} s")
    engine = open_registry()
    for ui in ("a1111", "comfyui"):
        add_root(engine, paths[ui])
    roots = roots_to_scan(engine)[0]

    start = time.perf_counter()
    report = scan.scan_paths(roots, engine)
    print(f"first scan: {report.summary()} in {time.perf_counter() - start:.1f} s")

    reads: list[str] = []
    real_hash, real_probe = scan.hash_file, probe_module.probe
    scan.hash_file = lambda path, *a, **k: reads.append(str(path)) or real_hash(path, *a, **k)
    probe_module.probe = lambda path, *a, **k: reads.append(str(path)) or real_probe(path, *a, **k)

    walk_cpu, walk_s, walked = cpu_and_wall(lambda: walk_and_stat([Path(r) for r in roots]), options.runs)
    rescan_cpu, rescan_s, report = cpu_and_wall(lambda: scan.scan_paths(roots, engine), options.runs)
    assert (report.indexed, len(reads)) == (0, 0), report.summary()
    rescan_cli = min(command("scan") for _ in range(options.runs))
    print(f"unchanged rescan of {report.unchanged} files: in-process {rescan_s:.2f} s wall / {rescan_cpu:.2f} s CPU; "
          f"`adapterzoo scan` {rescan_cli[0]:.2f} s wall / {rescan_cli[1]:.2f} s CPU; os.walk + stat of the "
          f"{walked} files {walk_s:.2f} s / {walk_cpu:.2f} s CPU (in-process CPU ratio {rescan_cpu / walk_cpu:.1f})")

    renamed = sorted(paths["a1111_loras"].rglob("*.safetensors"))[:1000] + sorted(
        paths["checkpoints"].glob("*.safetensors"))
    target = _mkdir(paths["a1111_loras"] / "renamed")
    moves = [(path, target / f"renamed-{i}-{path.name}") for i, path in enumerate(renamed)]
    start = time.perf_counter()
    for path in renamed:
        hashing.hash_file(path)
    hash_s = time.perf_counter() - start
    for source, destination in moves:
        source.rename(destination)
    rename_cpu, rename_s, report = cpu_and_wall(lambda: scan.scan_paths(roots, engine), 1)
    assert report.moved == len(moves) and report.missing == 0, report.summary()
    print(f"rename of {len(moves)} files ({options.large} large): recognised in {rename_s:.2f} s wall / "
          f"{rename_cpu:.2f} s CPU with {len(reads)} files hashed or probed ({report.moved} moved); hashing them "
          f"would take {hash_s:.2f} s (ratio {rename_s / hash_s:.2f})")

    def group_by() -> int:
        with engine.connect() as connection:
            return len(connection.execute(text(
                "SELECT f.sha256 FROM locations l JOIN files f ON f.id = l.file_id WHERE NOT l.missing "
                "GROUP BY f.sha256 HAVING COUNT(*) > 1")).all())

    _, floor_s, groups = cpu_and_wall(group_by, options.runs)
    dupes_cpu, dupes_s, found = cpu_and_wall(lambda: find_dupes(engine), options.runs)
    assert len(found) == groups, (len(found), groups)
    dupes_cli = min(command("dupes", "--json") for _ in range(options.runs))
    print(f"dupes: {len(found)} groups, in-process {dupes_s:.2f} s wall / {dupes_cpu:.2f} s CPU; `adapterzoo dupes "
          f"--json` {dupes_cli[0]:.2f} s wall / {dupes_cli[1]:.2f} s CPU; a bare SQL GROUP BY {floor_s:.3f} s")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
