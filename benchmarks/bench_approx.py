"""`adapterzoo convert IN --to kohya --rank 4` of LyCORIS files: the structured SVDs (formats/lora/delta_svd) against
the dense thin SVD of each module's ΔW that convert did before, on real and real-shaped SD1 files.

Files: the three early-LyCORIS LoKr files in tests/fixtures/real (350 modules each, convs with the kernel split
between both factors), and two it builds with every SD1 UNet and text-encoder module the built-in table has: a
LoKr in that early layout (both factors decomposed, rank 8) and a LoHa (rank 8, 3x3 convs flat).

For each file:
- whole process: `adapterzoo convert --rank 4` against the same command without `--rank` (which writes the
  LyCORIS modules through unchanged: reading, probing and writing the same file), best of --runs;
- in-process, on a sample of modules (all with --all): the structured SVD against torch.linalg.svd of the
  module's fp32 ΔW (the old way), time ratio, and the largest relative difference of the rank-4 ΔW from a
  float64 dense SVD's (target <= 1e-5).

    python benchmarks/bench_approx.py [--runs 3] [--all] [--max-elements 4000000]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapterzoo.formats.lora.delta_svd import module_svd
from adapterzoo.formats.lora.lora_model import LohaModule, LokrModule
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.model.architectures import builtin_architecture

REAL = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "real"
REAL_FILES = [REAL / f"smart_falcon_{n}_lokr.safetensors" for n in (4, 8, 16)]
RANK = 4


def near_square(n: int) -> tuple[int, int]:
    """LyCORIS factorization(n, -1): m <= k, m * k = n, closest to sqrt(n)."""
    m = math.isqrt(n)
    while n % m:
        m -= 1
    return m, n // m


def sd1_targets() -> dict[str, tuple[int, ...]]:
    """kohya name -> weight shape of every SD1 Linear and Conv2d module the built-in table has."""
    architecture = builtin_architecture("sd1")
    return {architecture.kohya_name(t): tuple(t.shape) for t in architecture.targets.values() if len(t.shape) in (2, 4)}


def make_lokr(path: Path, rank: int = 8) -> None:
    """Early-LyCORIS LoKr on every SD1 module: out = a·b, in·k·k = c·d, both factors rank-`rank` products."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in sd1_targets().items():
        (a, b), (c, d) = near_square(shape[0]), near_square(math.prod(shape[1:]))
        for part, rows, cols in (("w1", a, c), ("w2", b, d)):
            tensors[f"{name}.lokr_{part}_a"] = (torch.randn(rows, rank, generator=gen) * 0.1).half()
            tensors[f"{name}.lokr_{part}_b"] = (torch.randn(rank, cols, generator=gen) * 0.1).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})


def make_loha(path: Path, rank: int = 8) -> None:
    """LoHa on every SD1 module, rank `rank`, 3x3 convs with the kernel flat in w_b [r, in·9]."""
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in sd1_targets().items():
        out, inner = shape[0], math.prod(shape[1:])
        for part in ("w1", "w2"):
            tensors[f"{name}.hada_{part}_a"] = (torch.randn(out, rank, generator=gen) * 0.1).half()
            tensors[f"{name}.hada_{part}_b"] = (torch.randn(rank, inner, generator=gen) * 0.1).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})


def whole_process(args: list[str], runs: int) -> float:
    """Best wall time of `adapterzoo ARGS` as a fresh process."""
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "adapterzoo", *args], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def sample(modules: dict, every: bool, max_elements: int) -> dict:
    """All modules, or one of each distinct shape and kind up to `max_elements` elements of ΔW."""
    if every:
        return modules
    picked, seen = {}, set()
    for path, module in modules.items():
        key = (type(module), module.shape)
        if key not in seen and math.prod(module.shape) <= max_elements:
            seen.add(key)
            picked[path] = module
    return picked


def compare(module: LohaModule | LokrModule) -> tuple[float, float, float]:
    """(structured seconds, dense fp32 SVD seconds, relative ΔW_4 difference from a float64 dense SVD)."""
    start = time.perf_counter()
    svd = module_svd(module, wanted=RANK)
    k = min(RANK, len(svd.s))
    up, down = svd.factors(k)
    ours = time.perf_counter() - start
    matrix = module.scaled_delta().reshape(module.shape[0], -1)
    start = time.perf_counter()
    torch.linalg.svd(matrix, full_matrices=False)
    dense = time.perf_counter() - start
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]
    norm = float(best.norm())
    difference = float(torch.linalg.norm(up.double() @ down.double() - best)) / norm if norm else 0.0
    return ours, dense, difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="whole-process runs per command (best is kept)")
    parser.add_argument("--all", action="store_true", help="compare every module with a dense SVD (slow)")
    parser.add_argument("--max-elements", type=int, default=4_000_000,
                        help="without --all: the largest ΔW (out x in·k·k) of the sampled modules")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        made = {"sd1 LoKr, early layout, rank 8 (made)": work / "lokr_sd1.safetensors",
                "sd1 LoHa, rank 8 (made)": work / "loha_sd1.safetensors"}
        make_lokr(made["sd1 LoKr, early layout, rank 8 (made)"])
        make_loha(made["sd1 LoHa, rank 8 (made)"])
        files = {**{f"{p.name} (real)": p for p in REAL_FILES}, **made}
        print(f"convert --to kohya --rank {RANK}, whole process, best of {args.runs}; torch threads 1 in-process")
        print(f"{'file':44} {'modules':>7} {'--rank 4':>9} {'no --rank':>9} {'ratio':>6}  "
              f"{'sampled':>7} {'ours':>8} {'dense':>8} {'speed-up':>8} {'max rel dΔW':>11}")
        for label, path in files.items():
            out = work / "out.safetensors"
            approx = whole_process(["convert", str(path), "-o", str(out), "--to", "kohya", "--rank", str(RANK),
                                    "--force"], args.runs)
            plain = whole_process(["convert", str(path), "-o", str(out), "--to", "kohya", "--force"], args.runs)
            modules = load_lora(path).modules
            picked = sample(modules, args.all, args.max_elements)
            ours = dense = worst = 0.0
            for module in picked.values():
                t_ours, t_dense, difference = compare(module)
                ours, dense, worst = ours + t_ours, dense + t_dense, max(worst, difference)
            print(f"{label:44} {len(modules):7d} {approx:8.2f}s {plain:8.2f}s {approx / plain:6.2f}  "
                  f"{len(picked):7d} {ours:7.3f}s {dense:7.2f}s {dense / ours:7.0f}x {worst:11.1e}")


if __name__ == "__main__":
    main()
