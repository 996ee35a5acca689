"""Resize an SD1.5-shaped rank-128 LoRA to rank 32: adapterzoo's factor QR against full ΔW + thin SVD.

The baseline is what resize scripts usually do per module (kohya resize_lora): form the out x in
delta, take torch.linalg.svd(full_matrices=False), keep the leading singular triplets. Both methods
run in this process on the same random factors, so interpreter and torch start-up are outside both
timings. Prints both times, the speed-up, and how closely the two results agree.

    python benchmarks/bench_resize.py [--device cpu|cuda] [--rank 128] [--new-rank 32] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch

from adapterzoo.devices import pick_device
from adapterzoo.ops.lowrank import Rank, truncate

# SD1.5 config values: UNet block_out_channels, cross_attention_dim, transformers per down/up block;
# CLIP-L text encoder hidden and intermediate size, layer count.
UNET_CHANNELS = (320, 640, 1280)
CROSS_ATTENTION_DIM = 768
DOWN_ATTENTIONS, UP_ATTENTIONS = 2, 3
TE_HIDDEN, TE_INTERMEDIATE, TE_LAYERS = 768, 3072, 12

Module = tuple[str, int, int, int]  # (name, out, in, kernel: 0 for a linear layer, 1 for a 1x1 conv)


def transformer_modules(prefix: str, c: int) -> list[Module]:
    """The 12 LoRA targets of one SD1 Transformer2DModel: proj_in/out are 1x1 convs, GEGLU is 2·4c wide."""
    linear = [("attn1.to_q", c, c), ("attn1.to_k", c, c), ("attn1.to_v", c, c), ("attn1.to_out.0", c, c),
              ("attn2.to_q", c, c), ("attn2.to_k", c, CROSS_ATTENTION_DIM), ("attn2.to_v", c, CROSS_ATTENTION_DIM),
              ("attn2.to_out.0", c, c), ("ff.net.0.proj", 8 * c, c), ("ff.net.2", c, 4 * c)]
    block = f"{prefix}.transformer_blocks.0"
    return ([(f"{prefix}.proj_in", c, c, 1)] + [(f"{block}.{name}", o, i, 0) for name, o, i in linear]
            + [(f"{prefix}.proj_out", c, c, 1)])


def sd15_modules() -> list[Module]:
    """The 192 UNet + 72 text-encoder modules a kohya SD1.5 LoRA trains."""
    modules: list[Module] = []
    for level, c in enumerate(UNET_CHANNELS):
        for j in range(DOWN_ATTENTIONS):
            modules += transformer_modules(f"unet.down_blocks.{level}.attentions.{j}", c)
    modules += transformer_modules("unet.mid_block.attentions.0", UNET_CHANNELS[-1])
    for level, c in enumerate(reversed(UNET_CHANNELS), start=1):
        for j in range(UP_ATTENTIONS):
            modules += transformer_modules(f"unet.up_blocks.{level}.attentions.{j}", c)
    for layer in range(TE_LAYERS):
        prefix = f"text_encoder.encoder.layers.{layer}"
        modules += [(f"{prefix}.self_attn.{p}_proj", TE_HIDDEN, TE_HIDDEN, 0) for p in ("q", "k", "v", "out")]
        modules += [(f"{prefix}.mlp.fc1", TE_INTERMEDIATE, TE_HIDDEN, 0),
                    (f"{prefix}.mlp.fc2", TE_HIDDEN, TE_INTERMEDIATE, 0)]
    assert len(modules) == 264, len(modules)
    return modules


def random_lora(modules: list[Module], rank: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """fp16 factors shaped like a kohya file's: up [out, r(, 1, 1)], down [r, in(, 1, 1)]."""
    generator = torch.Generator(device=device).manual_seed(0)
    lora = []
    for _, out, inner, kernel in modules:
        tail = (1, 1) if kernel else ()
        up = torch.randn(out, rank, *tail, device=device, generator=generator) * 0.01
        down = torch.randn(rank, inner, *tail, device=device, generator=generator) / inner**0.5
        lora.append((up.half(), down.half()))
    return lora


def full_svd_resize(up: torch.Tensor, down: torch.Tensor, scale: float, new_rank: int
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The baseline: explicit out x in ΔW, thin SVD, leading triplets with √σ on each side."""
    matrix = scale * (up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:new_rank].sqrt()
    retained = float(s[:new_rank].square().sum().sqrt() / s.square().sum().sqrt())
    return u[:, :new_rank] * root, root[:, None] * vh[:new_rank], retained


def timed(device: torch.device, run: Callable[[], object]) -> tuple[float, object]:
    """Wall time of run(), waiting for queued GPU work on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--new-rank", type=int, default=32)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (on a shared machine, 1 is steadier)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    modules = sd15_modules()
    lora = random_lora(modules, args.rank, device)
    scale, rule = 64 / args.rank, Rank(args.new_rank)

    # Warm both paths up (MKL/cuSOLVER handles, CUDA context) on the smallest module.
    truncate(*lora[0], scale, rule)
    full_svd_resize(*lora[0], scale, args.new_rank)

    # Module by module, one method after the other, so background load falls on both alike.
    ours_s = base_s = 0.0
    ours, base = [], []
    for up, down in lora:
        seconds, result = timed(device, partial(truncate, up, down, scale, rule))
        ours_s += seconds
        ours.append(result)
        seconds, result = timed(device, partial(full_svd_resize, up, down, scale, args.new_rank))
        base_s += seconds
        base.append(result)

    worst_fraction, worst_delta, error_ours, error_base = 0.0, 0.0, 0.0, 0.0
    for (up, down), t, (b_up, b_down, b_retained) in zip(lora, ours, base):
        full = scale * (up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1))
        ours_k = t.up.reshape(t.up.shape[0], -1) @ t.down.reshape(t.kept_rank, -1)
        base_k = b_up @ b_down
        worst_fraction = max(worst_fraction, abs(t.retained_fro - b_retained))
        worst_delta = max(worst_delta, float((ours_k - base_k).norm() / base_k.norm()))
        error_ours += float((full - ours_k).norm() ** 2)
        error_base += float((full - base_k).norm() ** 2)

    print(f"device {device} ({torch.get_num_threads()} CPU threads); {len(modules)} SD1.5 modules, rank {args.rank} -> {args.new_rank}")
    print(f"factor QR + {args.rank}x{args.rank} SVD (adapterzoo): {ours_s:8.3f} s")
    print(f"full delta + thin SVD (baseline):   {base_s:8.3f} s")
    print(f"speed-up: {base_s / ours_s:.1f}x")
    print(f"largest retained-fraction difference: {worst_fraction:.2e}; "
          f"largest relative difference of the rank-{args.new_rank} deltas: {worst_delta:.2e}")
    print(f"total reconstruction error ‖ΔW - ΔW_k‖_F: adapterzoo {error_ours ** 0.5:.6f}, "
          f"baseline {error_base ** 0.5:.6f}")


if __name__ == "__main__":
    main()
