"""Merge a rank-32 kohya LoRA into a full-size SD1.5 UNet (fp16, random weights): time and memory.

The baseline is the least any merge must do: read every tensor with safetensors' `safe_open` and
stream it into a new file with the same writer. Each run is a fresh subprocess, so each peak RSS is
its own; a bare `import torch` process is the memory floor both are measured against. Times are
taken inside the process around the work (interpreter and library imports outside) and also for the
whole process. The checkpoint (1.7 GB, `model.diffusion_model.*` keys from the real SD1.5 config)
and the LoRA are written once into --dir and reused.

    python benchmarks/bench_merge.py [--dir DIR] [--runs 3] [--threads N]

The merge runs in-process with the provenance hashing the CLI uses (`zoo.known_hashes.hash_in_background`,
started with the timed work) on an unscanned checkpoint, which it hashes, and on one a scan has put in a
registry (made in --dir), whose SHA-256 it takes from there; and without any hashing, so the cost of each
part shows. Then the real
`adapterzoo merge` command runs both ways, whole processes against the baseline's: the CLI starts hashing
before it imports torch, so that work overlaps the start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterzoo.formats.families.sd.modules import UNET_CONFIGS
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, write_safetensors
from adapterzoo.formats.model.architectures import builtin_architecture
from adapterzoo.formats.model.unet_names import LDM_PREFIX, diffusers_to_ldm_module, layout_from_config

RANK, ALPHA = 32, 16.0
KOHYA_UNET = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")

HASHERS = {  # how the merge gets its inputs' SHA-256, in a thread beside the merge
    "unscanned": "as the CLI, unscanned (hashes)",
    "scanned": "as the CLI, scanned (registry's SHA-256)",
    "none": "no hashing",
}
BARE = """
import resource, sys, torch
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
BASELINE = """
import json, resource, sys, time, torch
from safetensors import safe_open
from adapterzoo.formats.io.safetensors_header import read_header
from adapterzoo.formats.io.safetensors_writer import TORCH_DTYPES, PlannedTensor, write_safetensors
torch.set_num_threads(int(sys.argv[3]))
start = time.perf_counter()
header = read_header(sys.argv[1])
handle = safe_open(sys.argv[1], framework="pt")
plan = [PlannedTensor(k, info.shape, TORCH_DTYPES[info.dtype], lambda k=k: handle.get_tensor(k))
        for k, info in header.tensors.items()]
write_safetensors(sys.argv[2], plan, header.metadata)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
CLI = """
import json, resource, sys
from adapterzoo.cli import main
try:
    main()
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
print(json.dumps({"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""
CLI_MODES = {"unscanned": "adapterzoo merge, unscanned", "scanned": "adapterzoo merge, scanned"}
MERGE = """
import json, resource, sys, time, torch
from pathlib import Path
from adapterzoo.ops.merge_checkpoint import LoraSpec, merge_checkpoint
from adapterzoo.zoo.known_hashes import hash_in_background
torch.set_num_threads(int(sys.argv[4]))
start = time.perf_counter()
inputs, mode = sys.argv[1:3], sys.argv[5]
if mode == "none":
    sha256 = lambda path: "0" * 64
else:  # as the CLI: the inputs' hashing (or registry lookup) starts first, in the background
    sha256 = hash_in_background(inputs, sys.argv[6] if mode == "scanned" else sys.argv[6] + ".absent")
report = merge_checkpoint(sys.argv[1], [LoraSpec(Path(sys.argv[2]), 0.8)], sys.argv[3], sha256=sha256)
print(json.dumps({"seconds": time.perf_counter() - start, "merged": report["tensors_merged"],
                  "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_checkpoint(path: Path) -> None:
    """Every SD1.5 UNet tensor under its LDM key, fp16, random (std 0.02), generated one at a time."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sd1"])
    layout = layout_from_config(dict(unet.config))
    generator = torch.Generator().manual_seed(0)
    plan = [PlannedTensor(LDM_PREFIX + diffusers_to_ldm_module(name, layout), tuple(p.shape), torch.float16,
                          lambda shape=tuple(p.shape): (torch.randn(shape, generator=generator) * 0.02).half())
            for name, p in unet.named_parameters()]
    write_safetensors(path, plan, {"format": "pt"})


def write_lora(path: Path) -> int:
    """A kohya rank-32 LoRA on the 192 attention/projection/feed-forward modules of the SD1.5 UNet."""
    architecture = builtin_architecture("sd1")
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for target in architecture.targets.values():
        if target.component != "unet" or not KOHYA_UNET.search(target.path):  # the 192 modules kohya trains
            continue
        name, tail = architecture.kohya_name(target), (1, 1) if len(target.shape) == 4 else ()
        tensors[f"{name}.lora_down.weight"] = (torch.randn(RANK, target.shape[1], *tail, generator=generator)
                                               / target.shape[1] ** 0.5).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(target.shape[0], RANK, *tail, generator=generator)
                                             * 0.01).half()
        tensors[f"{name}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    save_file(tensors, str(path), {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK)})
    return len(tensors) // 3


def run(script: str, *args: str) -> tuple[float, dict]:
    """(whole-process wall seconds, what the script printed as JSON) of a fresh interpreter."""
    os.sync()  # the previous run's dirty pages are written back now, not during this one
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    last = done.stdout.strip().splitlines()[-1]
    return wall, json.loads(last) if last.startswith("{") else {"rss_kib": int(last)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where the checkpoint and LoRA are kept (default: a temp folder)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, lora = folder / "sd15_unet_fp16.safetensors", folder / "lora_r32.safetensors"
    if not checkpoint.exists():
        write_checkpoint(checkpoint)
    modules = write_lora(lora)
    out = folder / "out.safetensors"
    threads = str(args.threads)
    registry = folder / "registry.db"  # a rescan of the unchanged checkpoint takes milliseconds
    subprocess.run([sys.executable, "-c", "from adapterzoo.cli import main; main()", "--db", str(registry),
                    "scan", str(checkpoint)], check=True, capture_output=True)

    bare = [run(BARE)[1]["rss_kib"] for _ in range(args.runs)]
    base_runs: list[tuple[float, dict]] = []
    merge_runs: dict[str, list[tuple[float, dict]]] = {mode: [] for mode in HASHERS}
    cli_runs: dict[str, list[tuple[float, dict]]] = {mode: [] for mode in CLI_MODES}
    for _ in range(args.runs):  # interleaved, so background load falls on all alike
        base_runs.append(run(BASELINE, str(checkpoint), str(out), threads))
        out.unlink()
        for mode, runs in merge_runs.items():
            runs.append(run(MERGE, str(checkpoint), str(lora), str(out), threads, mode, str(registry)))
            out.unlink()
        for mode, runs in cli_runs.items():
            db = str(registry) if mode == "scanned" else str(registry) + ".absent"
            runs.append(run(CLI, "--db", db, "merge", str(checkpoint), "--lora", f"{lora}:0.8", "-o", str(out)))
            out.unlink()

    def summary(runs: list[tuple[float, dict]]) -> tuple[float, float, float, float]:
        inner = [r[1]["seconds"] for r in runs]
        return (statistics.median(inner), min(inner), statistics.median(r[0] for r in runs),
                max(r[1]["rss_kib"] for r in runs) / 1024)

    floor = max(bare) / 1024
    base_s, base_min, base_wall, base_rss = summary(base_runs)
    size = checkpoint.stat().st_size / 2**30
    print(f"SD1.5 UNet fp16 ({size:.2f} GiB), LoRA rank {RANK} on {modules} modules; {threads} torch threads, "
          f"{args.runs} runs each: median (min) of the work, median of the whole process")
    print(f"{'baseline: safe_open read + streaming write':46} {base_s:6.2f} s ({base_min:5.2f})  "
          f"process {base_wall:6.2f} s  peak RSS {base_rss:6.0f} MiB")
    for mode, runs in merge_runs.items():
        merge_s, merge_min, merge_wall, merge_rss = summary(runs)
        print(f"{'merge, ' + HASHERS[mode]:46} {merge_s:6.2f} s ({merge_min:5.2f})  process {merge_wall:6.2f} s  "
              f"peak RSS {merge_rss:6.0f} MiB")
        print(f"{'':6}ratio to baseline: median {merge_s / base_s:.2f}, min {merge_min / base_min:.2f} (budget 1.5), "
              f"whole processes {merge_wall / base_wall:.2f}; RSS above bare torch {merge_rss - floor:.0f} MiB "
              "(budget 1024)")
    for mode, runs in cli_runs.items():
        walls = [r[0] for r in runs]
        rss = max(r[1]["rss_kib"] for r in runs) / 1024
        print(f"{CLI_MODES[mode]:46} process {statistics.median(walls):6.2f} s ({min(walls):5.2f})  "
              f"peak RSS {rss:6.0f} MiB; ratio of whole processes to the baseline's: median "
              f"{statistics.median(walls) / base_wall:.2f}, min {min(walls) / min(r[0] for r in base_runs):.2f}")
    print(f"bare `import torch` process peak RSS {floor:.0f} MiB; baseline above it {base_rss - floor:.0f} MiB")


if __name__ == "__main__":
    main()
