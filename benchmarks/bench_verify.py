"""One UNet step of a full-size SD1.5 UNet (random weights) with a rank-32 LoRA hooked in at run time, against
the bare UNet's step; the memory the LoRA holds once hooked in (the distinct tensor storages of the file read
into canonical form and of the hooks' terms, counted exactly: RSS on this shared machine moves by more than
the file's size between steps), against the file's size; and proof that changing the
multiplier touches no weight.

    python benchmarks/bench_verify.py [--threads 1] [--latent 32] [--rounds 5] [--device cpu]

The UNet is built from the SD1.5 config in code (no download). The LoRA is a kohya file (fp16, as real ones
are) with rank-32 factors on every attention projection and feed-forward linear (160 modules), read and
hooked exactly as `verify` does (`load_lora` + `runtime_lora.apply_lora`). A step is the CFG batch of two
at one timestep. Each round times the bare step, hooks the LoRA in, times the hooked step and removes it,
so drift of this shared machine falls on both alike; medians and minima are compared. Targets (issue 9 §5):
ratio <= 1.25, memory above the pipeline <= 2x the file.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from adapterzoo.formats.families.sd.modules import UNET_CONFIGS
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.verify.runtime_lora import apply_lora, live_modules

RANK, ALPHA = 32, 16.0
TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")


def tensor_bytes(lora, targets: dict[str, torch.nn.Module]) -> int:
    """Exact bytes of the distinct storages the canonical file and the hooks' terms hold."""
    tensors = [t for m in lora.modules.values() for t in vars(m).values() if isinstance(t, torch.Tensor)]
    for module in targets.values():
        for hook in module._forward_hooks.values():
            term = hook.__defaults__[1]  # hook(mod, inputs, output, path=path, term=term)
            tensors += [t for t in vars(term).values() if isinstance(t, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def write_lora(unet: torch.nn.Module, path: Path) -> int:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and TARGETS.search(name):
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (torch.randn(RANK, module.in_features, generator=g)
                                                  / module.in_features**0.5).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(module.out_features, RANK, generator=g) * 0.01).half()
            tensors[f"{key}.alpha"] = torch.tensor(ALPHA)
    save_file(tensors, str(path))
    return sum(1 for k in tensors if k.endswith(".alpha"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = a 256x256 image)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd1"]).to(device).eval().requires_grad_(False)
    sample = torch.randn(2, 4, args.latent, args.latent, device=device)
    context = torch.randn(2, 77, 768, device=device)
    timestep = torch.tensor(500, device=device)

    @torch.no_grad()
    def step() -> tuple[torch.Tensor, float]:
        sync()
        start = time.perf_counter()
        out = unet(sample, timestep, encoder_hidden_states=context).sample
        sync()
        return out, time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rank32.safetensors"
        modules = write_lora(unet, path)
        file_size = path.stat().st_size
        bare_out, _ = step()  # warm-up: allocator, kernels
        lora = load_lora(path, base="sd1")
    targets = live_modules({"unet": unet}, lora.architecture, list(lora.modules))
    applied = apply_lora(lora, targets)
    step()
    held = tensor_bytes(lora, targets)
    applied.remove()

    params = dict(unet.named_parameters())
    pointers = {name: p.data_ptr() for name, p in params.items()}
    sums = {name: p.double().sum().item() for name, p in params.items()}
    bare, hooked = [], []
    for _ in range(args.rounds):
        bare.append(step()[1])
        applied = apply_lora(lora, targets)
        hooked.append(step()[1])
        applied.remove()

    applied = apply_lora(lora, targets, 0.0)
    at_zero, _ = step()
    outputs = {}
    for multiplier in (0.5, 1.0):
        applied.multiplier = multiplier
        outputs[multiplier], _ = step()
    applied.remove()
    untouched = all(p.data_ptr() == pointers[n] and p.double().sum().item() == sums[n] for n, p in params.items())

    base, ours = statistics.median(bare), statistics.median(hooked)
    print(f"SD1.5 UNet, {args.latent}x{args.latent} latents, batch 2, {device.type}, {args.threads} thread(s), "
          f"rank-{RANK} LoRA on {modules} linears ({file_size / 2**20:.1f} MiB fp16 file)")
    print(f"bare UNet step       median {base:.3f} s, min {min(bare):.3f} s (of {args.rounds})")
    print(f"with the LoRA hooked median {ours:.3f} s, min {min(hooked):.3f} s")
    print(f"ratio                median {ours / base:.3f}, min {min(hooked) / min(bare):.3f}  (target <= 1.25)")
    print(f"memory held          {held / 2**20:.1f} MiB = {held / file_size:.2f}x the file (target <= 2)")
    print(f"multiplier 0 bit-identical to the bare UNet: {torch.equal(at_zero, bare_out)}; "
          f"0.5 and 1 differ: {not torch.equal(outputs[0.5], outputs[1.0])}; "
          f"weights untouched (same data_ptr and values): {untouched}")


if __name__ == "__main__":
    main()
