"""`adapterzoo resize` end to end on an SD1.5-shaped rank-128 kohya file, against the same command with the
per-module full-ΔW thin SVD in place of adapterzoo's factor QR.

Both run as fresh processes (read, hash, truncate, write, report). The start-up every torch program pays,
Python plus `import torch`, is timed on its own and subtracted from both, as the issue asks. Also times
`adapterzoo resize --help` and checks that a resize never imports diffusers or transformers.

    python benchmarks/bench_resize_cli.py [--rank 128] [--new-rank 32] [--repeat 2] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_resize import random_lora, sd15_modules
from safetensors.torch import load_file, save_file

# The baseline: the resize command itself, its truncation swapped for the explicit out x in ΔW and a thin
# torch.linalg.svd per module (what resize scripts usually do); everything else stays the same.
BASELINE = """
import sys
import torch
import adapterzoo.ops.resize as resize
from adapterzoo.ops.lowrank import Truncation

def full_svd(up, down, scale, rule, mid=None):
    matrix = scale * (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rule.n, len(s))
    root = s[:k].sqrt()
    retained = float(s[:k].norm() / s.norm())
    return Truncation((u[:, :k] * root).reshape(up.shape[0], k, *up.shape[2:]),
                      (root[:, None] * vh[:k]).reshape(k, *down.shape[1:]), k, retained, s)

resize.truncate = full_svd
from adapterzoo.cli import main
sys.argv = ["adapterzoo", *sys.argv[1:]]
main()
"""
IMPORTS_AFTER_RESIZE = """
import sys
from adapterzoo.cli import main
sys.argv = ["adapterzoo", *sys.argv[1:]]
try:
    main()
finally:
    print("heavy imports:", sorted(m for m in ("diffusers", "transformers") if m in sys.modules) or "none")
"""


def kohya_file(path: Path, rank: int) -> int:
    """Write the 264-module SD1.5 LoRA (fp16, alpha 64) with kohya names; returns its size in bytes."""
    modules = sd15_modules()
    sd: dict[str, torch.Tensor] = {}
    for (name, _, _, _), (up, down) in zip(modules, random_lora(modules, rank, torch.device("cpu"))):
        component, _, path_in = name.partition(".")
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        kohya = prefix + path_in.replace(".", "_")
        sd[f"{kohya}.lora_up.weight"], sd[f"{kohya}.lora_down.weight"] = up, down
        sd[f"{kohya}.alpha"] = torch.tensor(64.0)
    save_file(sd, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": "64"})
    return path.stat().st_size


def seconds(commands: list[list[str]], repeat: int, env: dict[str, str]) -> list[list[float]]:
    """Wall times of each command, `repeat` rounds of fresh processes taking turns (so background load falls
    on all alike); output discarded, a failure is fatal."""
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(repeat):
        for command, record in zip(commands, times):
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
            record.append(time.perf_counter() - start)
    return times


def largest_difference(a: Path, b: Path) -> float:
    """Largest relative Frobenius difference between the two files' per-module ΔW = alpha / r · up @ down."""
    sa, sb = load_file(a), load_file(b)
    worst = 0.0
    for key in (k for k in sa if k.endswith(".lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        da, db = ((s[f"{name}.lora_up.weight"].float().flatten(1) @ s[key].float().flatten(1))
                  * float(s[f"{name}.alpha"]) / s[key].shape[0] for s in (sa, sb))
        worst = max(worst, float((da - db).norm() / db.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--new-rank", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS for every process (on a shared machine, 1 is steadier)")
    args = parser.parse_args()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    cli = shutil.which("adapterzoo")
    if cli is None:
        sys.exit("the adapterzoo console script is not on PATH (pip install -e .)")
    with tempfile.TemporaryDirectory(prefix="bench-resize-") as tmp:
        folder = Path(tmp)
        src = folder / "sd15_r128.safetensors"
        size = kohya_file(src, args.rank)
        flags = ["resize", str(src), "--rank", str(args.new_rank), "--device", args.device, "--force"]
        ours_out, base_out = folder / "ours.safetensors", folder / "baseline.safetensors"

        bare, startup, help_times = seconds([[sys.executable, "-c", "pass"], [sys.executable, "-c", "import torch"],
                                             [cli, "resize", "--help"]], args.repeat + 3, env)
        ours, baseline = seconds([[cli, *flags, "-o", str(ours_out)],
                                  [sys.executable, "-c", BASELINE, *flags, "-o", str(base_out)]], args.repeat, env)
        imports = subprocess.run([sys.executable, "-c", IMPORTS_AFTER_RESIZE, *flags, "-o", str(ours_out)],
                                 check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]

        start = min(startup)
        ours_s, base_s = min(ours) - start, min(baseline) - start
        print(f"input: {len(sd15_modules())} SD1.5 modules, rank {args.rank} fp16, {size / 2**20:.0f} MiB; "
              f"rank {args.rank} -> {args.new_rank} on {args.device}, "
              f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '-')}; "
              f"best of {args.repeat}")
        print(f"python -c pass:                      {min(bare):7.3f} s")
        print(f"python + import torch (subtracted):  {start:7.3f} s")
        print(f"adapterzoo resize --help:            {min(help_times):7.3f} s "
              f"(median {statistics.median(help_times):.3f})")
        print(f"adapterzoo resize:                   {min(ours):7.3f} s -> {ours_s:7.3f} s without start-up")
        print(f"same, full-ΔW thin SVD baseline:     {min(baseline):7.3f} s -> {base_s:7.3f} s without start-up")
        print(f"speed-up (start-up subtracted): {base_s / ours_s:.1f}x; "
              f"with start-up: {min(baseline) / min(ours):.1f}x")
        worst = largest_difference(ours_out, base_out)
        print(f"largest relative difference of the rank-{args.new_rank} ΔW: {worst:.2e}")
        print(f"after a resize, {imports}")


if __name__ == "__main__":
    main()
