"""`verify`, `merge` and `resize` with two CPU-burning processes running, against the same commands on the machine
without them: how much a busy machine slows each down (target: at most 2.5x).

Each command runs as a fresh process, as a user runs it, with the threads adapterzoo decides (OMP_NUM_THREADS
is removed from its environment). Rounds alternate quiet and loaded runs so other load on the machine falls on
both alike; the best of each is kept. The load is two `while True: pass` processes (started and stopped here).
Beside wall time it reports the command's CPU time (user + system): OpenMP workers spinning against the burners
show up there, while a command that only waits its turn for a core keeps the CPU time it has on a quiet machine.
With --active the loaded runs are repeated with OMP_WAIT_POLICY=ACTIVE, what torch does by default (spinning
OpenMP workers), stopped after --active-limit seconds: the cliff this guards against.

    python benchmarks/bench_threads.py [--rounds 3] [--active] [--active-limit 120]

verify: a tiny SD1 pipeline (adapterzoo.tiny_models) and a rank-4 LoRA on its attention, 10 steps at 3
multipliers; merge: that LoRA into that pipeline folder; resize: an SD1.5-shaped rank-64 LoRA (264 modules,
fp16) to rank 16.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_resize_cli import kohya_file
from safetensors.torch import save_file

from adapterzoo.tiny_models import save_tiny_pipeline, tiny_pipeline

BURNER = "while True: pass"


def tiny_lora(path: Path) -> None:
    """A rank-4 kohya LoRA on every attention projection of the tiny SD1 UNet and text encoder."""
    pipeline = tiny_pipeline("sd1")
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for prefix, model in (("lora_unet", pipeline.unet), ("lora_te_text_model", pipeline.text_encoder)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(("to_q", "to_k", "to_v", "q_proj", "v_proj")):
                kohya = f"{prefix}_{name.replace('.', '_')}"
                sd[f"{kohya}.lora_down.weight"] = torch.randn(4, module.in_features, generator=gen) * 0.1
                sd[f"{kohya}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=gen) * 0.1
                sd[f"{kohya}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))


def run(args: list[str], env: dict[str, str], limit: float | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds of `adapterzoo ARGS` as a fresh process; (inf, inf) if it ran past `limit` (then stopped)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "adapterzoo", *args], check=True, capture_output=True, env=env,
                       timeout=limit)
    except subprocess.TimeoutExpired:
        return math.inf, math.inf
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def best(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return min(a[0], b[0]), min(a[1], b[1])


def burners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(n)]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--active", action="store_true", help="also time the loaded runs with spinning OpenMP waits")
    parser.add_argument("--active-limit", type=float, default=120.0, help="seconds before such a run is stopped")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        env["ADAPTERZOO_HOME"] = str(work / "home")
        pipeline = save_tiny_pipeline("sd1", work / "tiny_sd1")
        tiny_lora(work / "tiny_lora.safetensors")
        kohya_file(work / "sd15_rank64.safetensors", 64)
        commands = {
            "verify (tiny SD1, 10 steps x 3)": ["verify", str(work / "tiny_lora.safetensors"), "--checkpoint",
                                                str(pipeline), "--steps", "10", "-o", str(work / "grid.png")],
            "merge (tiny SD1 folder)": ["merge", str(pipeline), "--lora", str(work / "tiny_lora.safetensors"),
                                        "-o", str(work / "merged"), "--force"],
            "resize (SD1.5 rank 64 -> 16)": ["resize", str(work / "sd15_rank64.safetensors"), "-o",
                                             str(work / "r16.safetensors"), "--rank", "16", "--force"],
        }
        quiet = {name: (math.inf, math.inf) for name in commands}
        loaded = dict(quiet)
        active = dict(quiet)
        load_before = os.getloadavg()[0]
        for _ in range(args.rounds):
            for name, command in commands.items():
                quiet[name] = best(quiet[name], run(command, env))
                load = burners(2)
                try:
                    loaded[name] = best(loaded[name], run(command, env))
                finally:
                    stop(load)
        if args.active:
            for name, command in commands.items():
                load = burners(2)
                try:
                    active[name] = run(command, {**env, "OMP_WAIT_POLICY": "ACTIVE"}, args.active_limit)
                finally:
                    stop(load)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} usable cores, 2 burners; whole process, best of {args.rounds} alternating rounds; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (burners and this benchmark included)")
    header = f"{'command':34} {'quiet':>8} {'loaded':>8} {'ratio':>6} {'CPU quiet':>10} {'CPU loaded':>10} {'ratio':>6}"
    print(header + (f" {'loaded, spinning waits':>24}" if args.active else ""))
    for name in commands:
        (wall_q, cpu_q), (wall_l, cpu_l) = quiet[name], loaded[name]
        line = (f"{name:34} {wall_q:7.2f}s {wall_l:7.2f}s {wall_l / wall_q:6.2f} {cpu_q:9.2f}s {cpu_l:9.2f}s "
                f"{cpu_l / cpu_q:6.2f}")
        if args.active:
            wall_a = active[name][0]
            shown = f"> {args.active_limit:.0f}s" if math.isinf(wall_a) else f"{wall_a:.2f}s"
            line += f" {shown:>14} ({wall_a / wall_q:.1f}x)"
        print(line)


if __name__ == "__main__":
    main()
