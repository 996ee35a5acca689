"""`adapterzoo merge` of a rank-32 LoRA into a full-width Qwen-Image transformer file (bf16, >= 20 GB) vs copying it.

Issue 17: merging into a transformer of 20 GB or more keeps peak RSS under 1 GiB above a bare `import torch`
process and takes at most 1.5x a plain streaming copy of the file. The checkpoint is ComfyUI's
diffusion_models single file of Qwen-Image (diffusers' names, bare: `transformer_blocks.N.attn.to_q.weight`),
bf16, every tensor of `QwenImageTransformer2DModel` at the real width (3072, 24 heads of 128, joint dim 3584)
with its bias, names and shapes from adapterzoo's module table for the family. The real model has 60 blocks:
20.4 B parameters, 40.8 GB in bf16; `--blocks 30` gives 20.4 GB, the issue's size, where the disk will not
hold a 40.8 GB input and its 40.8 GB output at once. Each tensor is a zero-copy slice of one pool of random
bf16 values (std 0.02), written tensor by tensor by the streaming writer (bench_flux_merge's builder), so
the builder never holds the model. The LoRA is musubi-tuner's naming (`lora_unet_transformer_blocks_0_attn_to_q`),
bf16, rank 32, alpha 16, on the 8 attention Linears and 4 MLP Linears of every block, merged at weight 0.8.

In one run, each a process of its own measured by /usr/bin/time (wall, CPU, max RSS), after `sync` and after
dropping the checkpoint's own pages from the page cache (posix_fadvise DONTNEED; nothing else's), so that each
reads it from disk (`--warm` leaves the cache alone):
  1. `cp IN OUT` (GNU cp: the kernel copies, copy_file_range), a plain Python read/write loop through
     one 8 MiB buffer -- every byte through user space -- and, for scale, `dd` with O_DIRECT both ways (the
     merge's own way with a large file: past the page cache); each copy deleted;
  2. `python -m adapterzoo merge IN --lora LORA:0.8 -o OUT --json` (output another single file): first on an
     unscanned checkpoint, which it hashes (SHA-256, for the output's provenance) beside the merge, then after
     an untimed `adapterzoo scan` of it, with its SHA-256 from the registry;
  3. both copies again, so the page cache's part shows (the file is about the machine's RAM).
Baselines for memory: `python -c "import torch"` and a process importing what the merge imports. Then a few
merged tensors are compared with bf16(W + 0.8 * (alpha/r) * up @ down) computed in plain torch in fp32, and
a few untouched ones for bit-equality with the input.

    python benchmarks/bench_large_merge.py --workdir /work/bench_tmp/qwen --blocks 30   # 20.4 GB
    python benchmarks/bench_large_merge.py --blocks 2                                   # smoke check, 1.5 GB

Every file it writes is deleted at the end (also on failure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_flux_merge import check_rows, python, write_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterzoo.formats.families.qwen_image.modules import CONFIG, module_table
from adapterzoo.formats.io.safetensors_header import read_header

RANK, ALPHA, WEIGHT = 32, 16.0, 0.8
LORA_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                "txt_mlp.net.0.proj", "txt_mlp.net.2")
COPY_CHUNK = 8 << 20
PY_COPY = f"""
import sys
buffer = bytearray({COPY_CHUNK})
view = memoryview(buffer)
with open(sys.argv[1], "rb", buffering=0) as src, open(sys.argv[2], "wb", buffering=0) as dst:
    while n := src.readinto(buffer):
        done = 0
        while done < n:
            done += dst.write(view[done:n])
"""
BARE = "import torch"
MERGE_IMPORTS = ("import torch, adapterzoo.cli, adapterzoo.ops.merge_checkpoint, "
                 "adapterzoo.formats.families.qwen_image.checkpoint, adapterzoo.zoo.known_hashes")


def qwen_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the ComfyUI Qwen-Image file with `blocks` blocks: a Linear's weight and bias, a norm's weight."""
    shapes = {}
    for module, shape in module_table({**CONFIG, "num_layers": blocks}).modules:
        shapes[f"{module}.weight"] = tuple(shape)
        if len(shape) == 2:  # every Linear of QwenImageTransformer2DModel has a bias; RMSNorms have none
            shapes[f"{module}.bias"] = (shape[0],)
    return shapes


def kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def write_lora(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """musubi's rank-32 LoRA on every block's attention and MLP Linears."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or not module.endswith(LORA_MODULES):
            continue
        tensors[f"{kohya(module)}.lora_down.weight"] = (torch.randn(RANK, shape[1], generator=generator)
                                                        / shape[1] ** 0.5).bfloat16()
        tensors[f"{kohya(module)}.lora_up.weight"] = (torch.randn(shape[0], RANK, generator=generator)
                                                      * 0.05).bfloat16()
        tensors[f"{kohya(module)}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path), {"ss_network_module": "networks.lora_qwen_image", "ss_network_dim": str(RANK),
                                   "ss_network_alpha": str(ALPHA), "ss_base_model_version": "qwen_image"})
    return len(tensors) // 3


def spot_checks(blocks: int) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(module, rows) of merged tensors to compare with plain torch, and untouched tensors that must be bit-equal."""
    last, middle = blocks - 1, blocks // 2
    merged = [("transformer_blocks.0.attn.to_k", 0, 3072),
              (f"transformer_blocks.{middle}.img_mlp.net.0.proj", 4096, 6144),
              (f"transformer_blocks.{last}.txt_mlp.net.2", 0, 1024),
              (f"transformer_blocks.{last}.attn.to_add_out", 0, 3072)]
    untouched = [f"transformer_blocks.{middle}.img_mod.1.weight", f"transformer_blocks.{last}.attn.to_q.bias",
                 "transformer_blocks.0.attn.norm_added_k.weight", "txt_in.weight", "proj_out.bias"]
    return merged, untouched


def spot_check(checkpoint: Path, lora: Path, merged: Path, blocks: int) -> tuple[list[str], bool]:
    """Each merged row block against bf16(W + 0.8·(alpha/rank)·up@down) in fp32; untouched tensors bit-equal."""
    factors = load_file(str(lora))
    lines, all_ok = [], True
    rows, untouched = spot_checks(blocks)
    with safe_open(str(checkpoint), "pt") as before, safe_open(str(merged), "pt") as after:
        for module, start, stop in rows:
            line, ok = check_rows(before, after, factors, module, kohya(module), (start, stop), WEIGHT)
            all_ok &= ok
            lines.append(line)
        for name in untouched:
            ok = torch.equal(before.get_tensor(name), after.get_tensor(name))
            all_ok &= ok
            lines.append(f"  {name}: untouched, bit-equal to the input  {'OK' if ok else 'FAIL'}")
    return lines, all_ok


def evict(path: Path) -> None:
    """Write back dirty pages, then drop `path`'s pages from the page cache (only this file's): a cold read."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measured(command: list[str], cold: Path | None) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS in MiB, CPU seconds, stdout) of one process, by /usr/bin/time; `cold`'s pages
    are dropped from the page cache first."""
    if cold is not None:
        evict(cold)
    else:
        os.sync()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        done = subprocess.run(["/usr/bin/time", "-f", "%e %M %U %S", "-o", report.name, *command],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{command[:3]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        wall, rss_kib, user, system = report.read().split()
    return float(wall), int(rss_kib) / 1024, float(user) + float(system), done.stdout


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/work/bench_tmp/qwen"),
                        help="folder for the checkpoint, the LoRA and the outputs (all deleted at the end)")
    parser.add_argument("--warm", action="store_true",
                        help="leave the page cache as it is (by default the checkpoint's pages are dropped before each "
                             "measured process, so each reads it from disk)")
    parser.add_argument("--blocks", type=int, default=CONFIG["num_layers"],
                        help="transformer blocks, 60 (the real model, 40.8 GB) by default; 30 gives 20.4 GB")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    shapes = qwen_shapes(args.blocks)
    size = sum(torch.Size(s).numel() for s in shapes.values()) * 2
    free = shutil.disk_usage(args.workdir).free
    if free < 2 * size + (2 << 30):
        sys.exit(f"{args.workdir} has {free / 1e9:.1f} GB free; the {args.blocks}-block checkpoint ({size / 1e9:.1f} "
                 f"GB) and one output of it at once need {2 * size / 1e9:.1f} GB and 2 GiB to spare")
    checkpoint, lora = args.workdir / "qwen_image_bf16.safetensors", args.workdir / "qwen_lora_r32.safetensors"
    out = args.workdir / "out.safetensors"
    try:
        run(args, shapes, checkpoint, lora, out)
    finally:
        for path in (checkpoint, lora, out, checkpoint.with_suffix(".partial")):
            path.unlink(missing_ok=True)
        for leftover in args.workdir.glob(".*tmp*"):  # an interrupted merge's temporary output
            leftover.unlink(missing_ok=True)


def run(args: argparse.Namespace, shapes: dict[str, tuple[int, ...]], checkpoint: Path, lora: Path, out: Path) -> None:
    print(f"{os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB RAM, "
          f"{load()}", flush=True)
    start = time.perf_counter()
    write_checkpoint(checkpoint, shapes)
    size = checkpoint.stat().st_size
    print(f"built {checkpoint.name}: {len(shapes)} tensors, {size / 1e9:.2f} GB, in "
          f"{time.perf_counter() - start:.0f} s; "
          f"{load()}", flush=True)
    modules = write_lora(lora, shapes)
    print(f"LoRA: rank {RANK} on {modules} modules, {lora.stat().st_size / 2**20:.0f} MiB", flush=True)

    cold = None if args.warm else checkpoint
    print("page cache: " + ("as it comes" if args.warm else "the checkpoint's pages dropped before each process"))

    def note(label: str, wall: float, rss: float, cpu: float) -> None:
        print(f"{label:48} {wall:7.1f} s  CPU {cpu:6.1f} s  peak RSS {rss:6.0f} MiB  {size / wall / 1e9:5.2f} GB/s  "
              f"{load()}", flush=True)

    bare_s, bare_rss, bare_cpu, _ = measured(python(BARE), None)
    note("bare `python -c 'import torch'`", bare_s, bare_rss, bare_cpu)
    imports_s, imports_rss, imports_cpu, _ = measured(python(MERGE_IMPORTS), None)
    note("process importing what merge imports", imports_s, imports_rss, imports_cpu)
    copies: dict[str, list[float]] = {"cp": [], "py": [], "dd": []}

    def copy_both(round_: str) -> None:
        commands = {"cp": ["cp", str(checkpoint), str(out)], "py": python(PY_COPY, str(checkpoint), str(out)),
                    "dd": ["dd", f"if={checkpoint}", f"of={out}", "bs=16M", "iflag=direct", "oflag=direct",
                           "status=none"]}
        labels = {"cp": "`cp` (kernel copy_file_range)", "py": "Python read/write, 8 MiB buffer",
                  "dd": "`dd` with O_DIRECT both ways, 16 MiB blocks"}
        for key, command in commands.items():
            wall, rss, cpu, _ = measured(command, cold)
            out.unlink()
            copies[key].append(wall)
            note(f"{round_}: {labels[key]}", wall, rss, cpu)

    copy_both("copy 1")
    registry = args.workdir / "registry.db"
    merge = [sys.executable, "-m", "adapterzoo", "--db", str(registry), "merge", str(checkpoint),
             "--lora", f"{lora}:{WEIGHT}", "-o", str(out), "--json"]
    merge_s, merge_rss, merge_cpu, report = measured(merge, cold)
    note("adapterzoo merge, unscanned (hashes the input)", merge_s, merge_rss, merge_cpu)
    dtypes = sorted({info.dtype for info in read_header(out).tensors.values()})
    checks, ok = spot_check(checkpoint, lora, out, args.blocks)
    out.unlink()
    subprocess.run([sys.executable, "-m", "adapterzoo", "--db", str(registry), "scan", str(checkpoint)], check=True,
                   capture_output=True)  # untimed: the registry now knows the checkpoint's SHA-256
    scanned_s, scanned_rss, scanned_cpu, _ = measured(merge, cold)
    note("adapterzoo merge, scanned (SHA-256 from registry)", scanned_s, scanned_rss, scanned_cpu)
    out.unlink()
    registry.unlink()
    copy_both("copy 2")

    said = json.loads(report)
    print(f"\nQwen-Image ComfyUI single file, {args.blocks} blocks at width 3072: {len(shapes)} tensors, "
          f"{size / 2:.3g} parameters, bf16, {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB); musubi LoRA rank {RANK} "
          f"on {modules} modules, {lora.stat().st_size / 2**20:.0f} MiB; {os.cpu_count()} CPUs")
    print(f"merge reported {said['tensors_merged']} tensors merged, {said['tensors_copied']} copied as bytes, on "
          f"{said['device']}, warnings {said['warnings']}; output dtypes: {', '.join(dtypes)}")
    for merge_label, took in (("merge, unscanned", merge_s), ("merge, scanned", scanned_s)):
        for key, label in (("cp", "`cp`"), ("py", "Python read/write loop"), ("dd", "`dd` past the page cache")):
            print(f"{merge_label} / {label}: {took / copies[key][0]:.2f} against the first copy, "
                  f"{took / copies[key][1]:.2f} against the second (target <= 1.5)")
    for merge_label, rss in (("merge, unscanned", merge_rss), ("merge, scanned", scanned_rss)):
        print(f"{merge_label}: peak RSS above bare torch {rss - bare_rss:.0f} MiB (target < 1024), above its own "
              f"imports {rss - imports_rss:.0f} MiB")
    print("spot checks against plain torch:", *checks, sep="\n")
    if not ok:
        sys.exit("a spot check failed")


if __name__ == "__main__":
    main()
