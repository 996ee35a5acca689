"""Start-up of the header-only commands (issue 19 §2): `adapterzoo --help` and `adapterzoo probe` of a LoRA and of
a full-size SD1.5 checkpoint, whole process, wall time and peak RSS, against a bare `python -c pass` in the same
run (interleaved rounds, so a busy machine slows all alike); and which of torch, diffusers and transformers
each command imports (`python -X importtime`: none is the rule).

Targets on a quiet machine: probe <= 0.25 s and <= 60 MB peak RSS, --help <= 0.2 s. The load average is
printed: on a shared machine the absolute times say more about the neighbours than about the command.

    python3 benchmarks/bench_startup.py --rounds 15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "diffusers", "transformers")


def write_safetensors(path: Path, specs: dict[str, tuple[str, tuple[int, ...]]], values: dict[str, bytes]) -> Path:
    """A valid file: the given bytes for some tensors, zeros (a hole) for the rest."""
    sizes = {"F16": 2, "F32": 4}
    header, offset, data = {}, 0, {}
    for name, (dtype, shape) in specs.items():
        nbytes = sizes[dtype]
        for dim in shape:
            nbytes *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        data[offset] = values.get(name, b"")
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
        for start, value in data.items():
            if value:
                fh.seek(8 + len(raw) + start)
                fh.write(value)
    return path


def lora_specs() -> tuple[dict, dict]:
    """A kohya SD1.5 LoRA's header: rank 16 on 128 attention projections with fp32 alphas (real values)."""
    specs, values = {}, {}
    for block in range(16):
        for proj, width in (("to_q", 320), ("to_k", 768), ("to_v", 768), ("to_out_0", 320),
                            ("proj_in", 320), ("proj_out", 320), ("ff_net_2", 1280), ("ff_net_0_proj", 320)):
            stem = f"lora_unet_block_{block}_attn_{proj}"
            specs[f"{stem}.lora_down.weight"] = ("F16", (16, width))
            specs[f"{stem}.lora_up.weight"] = ("F16", (320, 16))
            specs[f"{stem}.alpha"] = ("F32", ())
            values[f"{stem}.alpha"] = struct.pack("<f", 8.0)
    return specs, values


def write_checkpoint(path: Path) -> Path:
    """Every key and shape of a real SD1.5 single file (the test factory's), as a 2 GB sparse file; written by
    a child, so this process never holds torch (a child's peak RSS starts from its parent's)."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import factory; "
              "factory.write_sparse_safetensors(sys.argv[2], factory.sd_checkpoint_specs('sd1'))")
    subprocess.run([sys.executable, "-c", script, str(tests), str(path)], check=True)
    return path


def measure(command: list[str], env: dict[str, str] | None) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one whole process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return elapsed, usage.ru_maxrss


def heavy_imports(command: list[str], env: dict[str, str] | None) -> list[str]:
    done = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], capture_output=True, text=True,
                          check=True, env=env)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    return sorted(imported & set(HEAVY))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--before", type=Path, metavar="CHECKOUT",
                        help="also time the probe of another adapterzoo checkout (e.g. the one before this change)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lora = write_safetensors(Path(tmp) / "lora.safetensors", *lora_specs())
        checkpoint = write_checkpoint(Path(tmp) / "sd15.safetensors")
        python = sys.executable
        commands = {
            "python -c pass (baseline)": [python, "-c", "pass"],
            "adapterzoo --help": [python, "-m", "adapterzoo", "--help"],
            "adapterzoo probe LoRA": [python, "-m", "adapterzoo", "probe", str(lora)],
            "adapterzoo probe SD1.5 checkpoint (2 GB)": [python, "-m", "adapterzoo", "probe", str(checkpoint)],
        }
        envs: dict[str, dict[str, str] | None] = dict.fromkeys(commands)
        if args.before:  # run from a neutral folder so `-m` finds the checkout named, not the current one
            commands["probe LoRA, --before checkout"] = commands["adapterzoo probe LoRA"]
            envs["probe LoRA, --before checkout"] = {**os.environ, "PYTHONPATH": str(args.before.resolve())}
        times: dict[str, list[float]] = {name: [] for name in commands}
        rss: dict[str, int] = dict.fromkeys(commands, 0)
        os.chdir(tmp)
        for _ in range(args.rounds):
            for name, command in commands.items():
                seconds, peak = measure(command, envs[name])
                times[name].append(seconds)
                rss[name] = max(rss[name], peak)
        base = statistics.median(times["python -c pass (baseline)"])
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, {args.rounds} interleaved rounds")
        print(f"{'command':42} {'min s':>7} {'median s':>9} {'median - pass':>14} {'x pass':>7} {'peak MB':>8}  imports")
        for name, command in commands.items():
            median = statistics.median(times[name])
            heavy = heavy_imports(command, envs[name]) if "probe" in name or "adapterzoo" in name else []
            print(f"{name:42} {min(times[name]):7.3f} {median:9.3f} {median - base:14.3f} {median / base:7.2f} "
                  f"{rss[name] / 1024:8.1f}  {', '.join(heavy) or 'no torch, diffusers, transformers'}")


if __name__ == "__main__":
    main()
