"""`adapterzoo merge` of a rank-16 kohya LoRA into a full-size Flux.1-dev BFL single file (bf16, 23.8 GB).

Issue 11 §2 claims the merge streams: peak RSS under 1 GiB above a bare `import torch` process on this
12B bf16 model, since it never holds the model, and the output stays bf16. The checkpoint has every tensor
of Flux.1-dev (width 3072, 19 double and 38 single blocks, guidance_in) under its BFL name, built one
tensor at a time by the streaming writer: each tensor is a zero-copy slice, at its own offset, of one
pool of 2×66M random bf16 values (std 0.02; 264 MB, two of the largest tensor), so the builder holds
the pool and nothing else. The LoRA is kohya (`lora_unet_double_blocks_0_img_attn_qkv`, ...) on every double block's
img/txt attn qkv and proj and mlp.0/mlp.2 and every single block's linear1 and linear2 (228 modules),
bf16, alpha 8, merged at weight 0.8.

Baselines of the same run: the peak RSS of a process that only imports torch, and of one that imports
what the merge imports; the time of a plain streaming copy of the same file (each tensor read into
memory by adapterzoo's reader and written by the same writer, as the merge does for the tensors it
changes). Every process is measured by /usr/bin/time (max RSS, wall). Then three merged tensors are
compared with W + ΔW computed here in plain torch in fp32 (each within one bf16 step of it, plus fp32
rounding of the operands where W + ΔW nearly cancels): the k rows of a fused double-block qkv, the MLP
rows of a single block's linear1, and a txt_attn.proj.

    python benchmarks/bench_flux_merge.py --workdir /tmp/fluxbench [--keep]

The checkpoint and LoRA in --workdir are reused when present; both outputs are always deleted after
being measured, and the checkpoint too unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterzoo.formats.families.flux.checkpoint import bfl_tensors
from adapterzoo.formats.families.flux.modules import FLUX_CLASS, FLUX_DEV_CONFIG, flux_architecture_from_tables
from adapterzoo.formats.io.safetensors_header import read_header
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, write_safetensors
from adapterzoo.formats.model.module_tables import module_table
from adapterzoo.formats.model.targets import TRANSFORMER

RANK, ALPHA, WEIGHT = 16, 8.0, 0.8
LORA_MODULES = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
                "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
# (BFL module, rows [start, stop) of its weight) compared with plain torch
SPOT_CHECKS = (("double_blocks.3.img_attn.qkv", 3072, 6144),  # the k block of a fused qkv
               ("single_blocks.20.linear1", 9216, 9216 + 1024),  # MLP-input rows of the fused linear1
               ("double_blocks.11.txt_attn.proj", 0, 3072))
BARE = "import torch"
MERGE_IMPORTS = ("import torch, adapterzoo.cli, adapterzoo.ops.merge_checkpoint, "
                 "adapterzoo.formats.checkpoint.flux_checkpoint, adapterzoo.zoo.known_hashes")
COPY = """
import sys
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, write_safetensors
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
source = open_checkpoint_file(sys.argv[1])
write_safetensors(sys.argv[2], [PlannedTensor(k, source.shapes[k], source.dtypes[k], lambda k=k: source.get(k))
                                for k in source.shapes], source.metadata)
"""


def flux_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the Flux.1-dev BFL file and its shape, from adapterzoo's module table."""
    architecture = flux_architecture_from_tables({TRANSFORMER: module_table(FLUX_CLASS, FLUX_DEV_CONFIG)})
    weights = {module.name: module.shape for module in architecture.bfl}
    head_dim = (FLUX_DEV_CONFIG["attention_head_dim"],)
    shapes = {}
    for tensor in bfl_tensors(FLUX_DEV_CONFIG):
        module, leaf = tensor.name.rsplit(".", 1)
        shapes[tensor.name] = {"weight": weights.get(module), "bias": weights.get(module, (0,))[:1]}.get(leaf, head_dim)
    return shapes


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """The BFL file, bf16, tensor by tensor; each a slice of one random pool (see the module docstring)."""
    largest = max(torch.Size(s).numel() for s in shapes.values())
    pool = torch.empty(2 * largest, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for start in range(0, pool.numel(), 1 << 24):
        chunk = pool[start:start + (1 << 24)]
        chunk.copy_(torch.randn(chunk.numel(), generator=generator) * 0.02)

    def piece(index: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = torch.Size(shape).numel()
        offset = (index * 7_919_003) % (pool.numel() - n + 1)
        return pool[offset:offset + n].view(shape)

    plan = [PlannedTensor(name, shape, torch.bfloat16, lambda i=i, s=shape: piece(i, s))
            for i, (name, shape) in enumerate(shapes.items())]
    partial = path.with_suffix(".partial")
    write_safetensors(partial, plan, {"format": "pt"})
    partial.rename(path)


def write_lora(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """The kohya rank-16 LoRA on the qkv/proj/mlp/linear1/linear2 modules of every block."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or not module.endswith(LORA_MODULES) or "_blocks." not in module:
            continue
        kohya = "lora_unet_" + module.replace(".", "_")
        tensors[f"{kohya}.lora_down.weight"] = (torch.randn(RANK, shape[1], generator=generator)
                                                / shape[1] ** 0.5).bfloat16()
        tensors[f"{kohya}.lora_up.weight"] = (torch.randn(shape[0], RANK, generator=generator) * 0.05).bfloat16()
        tensors[f"{kohya}.alpha"] = torch.tensor(ALPHA, dtype=torch.bfloat16)
    save_file(tensors, str(path), {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(RANK),
                                   "ss_network_alpha": str(ALPHA), "ss_base_model_version": "flux1"})
    return len(tensors) // 3


def measured(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one process, by /usr/bin/time."""
    os.sync()  # the previous run's dirty pages are written back now, not during this one
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", report.name, *command],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{command[:3]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        wall, rss_kib = report.read().split()
    return float(wall), int(rss_kib) / 1024, done.stdout


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def spot_check(checkpoint: Path, lora: Path, merged: Path) -> list[str]:
    """Each SPOT_CHECKS row block of the output against bf16(W + 0.8·(alpha/rank)·up@down) in fp32."""
    factors = load_file(str(lora))
    with safe_open(str(checkpoint), "pt") as before, safe_open(str(merged), "pt") as after:
        return [check_rows(before, after, factors, module, "lora_unet_" + module.replace(".", "_"), rows, WEIGHT)[0]
                for module, *rows in SPOT_CHECKS]


def check_rows(before, after, factors: dict[str, torch.Tensor], module: str, kohya: str, rows: tuple[int, int],
               multiplier: float) -> tuple[str, bool]:
    """One row block of a merged bf16 weight against bf16(W + multiplier·(alpha/rank)·up@down) of plain torch: a
    line to print, and whether it holds."""
    start, stop = rows
    up = factors[f"{kohya}.lora_up.weight"].float()[start:stop]
    down = factors[f"{kohya}.lora_down.weight"].float()
    scale = multiplier * factors[f"{kohya}.alpha"].float() / down.shape[0]
    weight = before.get_slice(f"{module}.weight")[start:stop]
    delta = scale * (up @ down)
    exact = weight.float() + delta
    got = after.get_slice(f"{module}.weight")[start:stop]
    # rounding to bf16 moves a value by up to one bf16 step (2^-7 of it); the fp32 sum itself may differ
    # by a few fp32 steps of its operands with the order of operations (it matters where W + ΔW cancels)
    bound = exact.abs() * 2.0 ** -7 + (weight.float().abs() + delta.abs()) * 2.0 ** -21
    worst = ((got.float() - exact).abs() / bound.clamp_min(2.0 ** -126)).max().item()
    unequal = int((got != exact.bfloat16()).sum())
    changed = (got != weight).float().mean().item()
    ok = got.dtype == torch.bfloat16 and worst <= 1 and changed > 0.5
    return (f"  {module}.weight rows {start}:{stop}: {got.dtype}, {unequal} of {got.numel()} values not "
            f"bit-equal to bf16(W + ΔW) of plain torch, worst error {worst:.2f} of its bound, "
            f"{changed:.0%} changed by the merge  {'OK' if ok else 'FAIL'}"), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="folder for the 24 GB files (reused)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and LoRA for the next run")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint, lora = args.workdir / "flux1-dev-bf16.safetensors", args.workdir / "flux_lora_r16.safetensors"
    out, copy = args.workdir / "merged.safetensors", args.workdir / "copy.safetensors"
    shapes = flux_shapes()
    if not checkpoint.exists():
        start = time.perf_counter()
        write_checkpoint(checkpoint, shapes)
        print(f"built {checkpoint} in {time.perf_counter() - start:.0f} s; this process's peak RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)
    modules = write_lora(lora, shapes)
    adapterzoo = shutil.which("adapterzoo") or sys.exit("the adapterzoo command is not on PATH")

    bare_s, bare_rss, _ = measured(python(BARE))
    imports_s, imports_rss, _ = measured(python(MERGE_IMPORTS))
    copy_s, copy_rss, _ = measured(python(COPY, str(checkpoint), str(copy)))
    copy.unlink()
    merge_s, merge_rss, report = measured([adapterzoo, "--db", str(args.workdir / "registry.db"), "merge",
                                           str(checkpoint), "--lora", f"{lora}:{WEIGHT}", "-o", str(out), "--json"])
    dtypes = sorted({info.dtype for info in read_header(out).tensors.values()})
    checks = spot_check(checkpoint, lora, out)
    out.unlink()

    size = checkpoint.stat().st_size
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"Flux.1-dev BFL single file: {len(shapes)} tensors, {params / 1e9:.2f} B parameters, bf16, "
          f"{size / 1e9:.2f} GB ({size / 2**30:.2f} GiB); kohya LoRA rank {RANK} on {modules} modules, "
          f"{lora.stat().st_size / 2**20:.0f} MiB; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"{'bare `import torch` process':44} {bare_s:7.1f} s  peak RSS {bare_rss:6.0f} MiB")
    print(f"{'process importing what merge imports':44} {imports_s:7.1f} s  peak RSS {imports_rss:6.0f} MiB")
    print(f"{'baseline: streaming read + write copy':44} {copy_s:7.1f} s  peak RSS {copy_rss:6.0f} MiB "
          f"({copy_rss - bare_rss:.0f} above bare torch)")
    print(f"{'adapterzoo merge (whole process)':44} {merge_s:7.1f} s  peak RSS {merge_rss:6.0f} MiB")
    print(f"merge / copy time: {merge_s / copy_s:.2f}; merge peak RSS above bare torch: {merge_rss - bare_rss:.0f} MiB "
          f"(target < 1024), above its own imports: {merge_rss - imports_rss:.0f} MiB")
    said = json.loads(report)
    print(f"merge reported {said['tensors_merged']} tensors merged, {said['tensors_copied']} copied as bytes, "
          f"on {said['device']}, warnings {said['warnings']}; output file's dtypes: {', '.join(dtypes)}")
    print("spot checks against plain torch:", *checks, sep="\n")
    if not args.keep:
        checkpoint.unlink()
        lora.unlink()


if __name__ == "__main__":
    main()
