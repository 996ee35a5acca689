"""`verify` over a library of 20 LoRAs on a real-size SD1.5 single file (random weights): seconds per file for
`--quick` and for a 4-step 256x256 grid, each as a ratio to one bare UNet forward timed in the same run; and
loading the single file into a pipeline in memory against a plain `safetensors.torch.load_file` of it.

    python benchmarks/bench_verify_library.py [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--files 20]

The model is built from the SD1.5 configs in code (no download), written as a diffusers folder and converted
to one LDM file by our converter. The LoRAs are kohya files (fp16) on every attention and feed-forward Linear
of the UNet, ranks 4 to 128. Each mode runs through `Verifier` as `verify` does, the checkpoint's own renders
and prediction cached (the first file pays them, as one run over a library does). A bare forward is the
verifier's own noise prediction (CFG-free, one batch) of the bare UNet; bare sampling is the verifier's own
render of the bare model (4 steps with CFG and the VAE decode), once per image a grid holds. Targets (issue
15 §2): --quick <= 4 bare forwards per file, grid <= 1.3x bare sampling of its images, load <= 1.3x load_file,
and the load's peak RSS <= 1.2x the model's tensors in the target dtype (measured in a fresh process, above its
RSS after the imports, beside the same for `load_file`).
`--device cuda` without CUDA says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint
from adapterzoo.formats.checkpoint.clip_tokenizer import MAX_LENGTH, special_tokens, vocabulary
from adapterzoo.formats.families.sd.modules import TEXT_ENCODER_CONFIGS, UNET_CONFIGS
from adapterzoo.formats.families.sd.to_diffusers import DATA
from adapterzoo.verify import denoise
from adapterzoo.verify.pipeline_load import DTYPES, load_pipeline
from adapterzoo.verify.verifier import FIXED_TIMESTEP, Verifier, VerifyOptions

RANKS = (4, 8, 16, 32, 64, 128)
TARGETS = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")
SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
          "block_out_channels": (128, 256, 512, 512),
          "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}
SIZE = (256, 256)
STEPS = 4


def build_checkpoint(folder: Path, dtype: torch.dtype) -> Path:
    """SD1.5 at real size, random weights, as one LDM single file in `folder`."""
    torch.manual_seed(0)
    clip = TEXT_ENCODER_CONFIGS["sd1"]["text_encoder"][0]
    vocab, merges, _ = vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=MAX_LENGTH,
                              **special_tokens("<|endoftext|>"))
    scheduler_config = json.loads((DATA / "scheduler_sd1.json").read_text(encoding="utf-8"))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD_VAE).to(dtype),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **clip)).to(dtype),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**UNET_CONFIGS["sd1"]).to(dtype),
        scheduler=getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipeline")
    del pipe
    gc.collect()
    single = folder / "sd15-random.safetensors"
    convert_checkpoint(folder / "pipeline", single, "ldm")
    for path in sorted((folder / "pipeline").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    return single


def write_loras(unet: torch.nn.Module, folder: Path, count: int) -> list[Path]:
    """`count` kohya LoRAs, ranks cycling 4..128, on the UNet's attention and feed-forward Linears."""
    g = torch.Generator().manual_seed(0)
    linears = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and TARGETS.search(n)]
    paths = []
    for i in range(count):
        rank = RANKS[i % len(RANKS)]
        tensors = {}
        for name, module in linears:
            key = "lora_unet_" + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, module.in_features, generator=g)
                                                  / module.in_features**0.5).half()
            tensors[f"{key}.lora_up.weight"] = (torch.randn(module.out_features, rank, generator=g) * 0.01).half()
            tensors[f"{key}.alpha"] = torch.tensor(rank / 2)
        paths.append(folder / f"lora-{i:02d}-r{rank}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths


LOAD_MEMORY = """
import json, resource, sys, torch
from pathlib import Path
from safetensors.torch import load_file
from adapterzoo.verify.pipeline_load import DTYPES, load_pipeline
torch.set_num_threads(1)
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024
before = rss()
if sys.argv[2] == "load_file":
    held = load_file(sys.argv[1], backend="pread")
    size = sum(t.numel() * t.element_size() for t in held.values())
else:
    pipe = load_pipeline(Path(sys.argv[1]), torch.device("cpu"), DTYPES[sys.argv[3]]).pipe
    tensors = {t.data_ptr(): t.numel() * t.element_size() for name in ("unet", "vae", "text_encoder")
               for t in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]}
    size = sum(tensors.values())
print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "after": rss(), "model": size}))
"""


def load_memory(single: Path, how: str, dtype_name: str) -> dict:
    """Peak and final RSS of a fresh process loading `single` (`load_file`, or our pipeline in memory), and the
    bytes of the tensors it then holds; `before` is its RSS after the imports."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LOAD_MEMORY, str(single), how, dtype_name], check=True,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_load(single: Path, size: int, dtype: torch.dtype) -> None:
    """Our in-memory load of the single file against `load_file`, time and peak memory. safetensors >= 0.6's
    `load_file` maps the file and reads no tensor until it is used (0.04 s for 4 GiB); the baseline is its
    `backend="pread"`, which reads every tensor into memory, as our load and older `load_file`s do."""
    lazy = [timed(lambda: load_file(str(single)), lambda: None) for _ in range(2)]
    plain = [timed(lambda: load_file(str(single), backend="pread"), lambda: None) for _ in range(2)]
    ours = [timed(lambda: load_pipeline(single, torch.device("cpu"), dtype), lambda: None) for _ in range(2)]
    print(f"single file {size / 2**30:.2f} GiB, in the page cache: load_file(backend='pread') {min(plain):.2f} s "
          f"(the default mmap backend, which reads nothing yet, {min(lazy):.2f} s), ours (pipeline in memory) "
          f"{min(ours):.2f} s, ratio {min(ours) / min(plain):.2f} (target <= 1.3); {load_average()}", flush=True)
    gc.collect()
    dtype_name = next(name for name, d in DTYPES.items() if d == dtype)
    for how in ("load_file", "pipeline"):
        memory = load_memory(single, how, dtype_name)
        grew, model = memory["peak"] - memory["before"], memory["model"]
        print(f"{how} in a fresh process: peak RSS {grew / 2**30:.2f} GiB above its imports, "
              f"{(memory['after'] - memory['before']) / 2**30:.2f} GiB held after; the model's tensors "
              f"{model / 2**30:.2f} GiB in {dtype_name}: peak {grew / model:.2f}x the model (target <= 1.2)"
              f"; {load_average()}", flush=True)


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--parts", nargs="+", choices=("load", "quick", "grid"), default=["load", "quick", "grid"],
                        help="what to measure (default: all three)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: --device cuda and no CUDA device here")
        return
    dtype = DTYPES[args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {args.device}, dtype {dtype}, threads {torch.get_num_threads()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-verify-library-", dir=Path.cwd()) as tmp:
        tmp = Path(tmp)
        single = build_checkpoint(tmp, dtype)
        size = single.stat().st_size
        if "load" in args.parts:
            measure_load(single, size, dtype)
        if "load" in args.parts and len(args.parts) == 1:
            return

        digests: dict[Path, str] = {}

        def hasher(path: Path) -> str:
            """A distinct stand-in digest per file: every file here is fresh, and hashing is not what is timed."""
            return digests.setdefault(Path(path), f"{len(digests):064x}")

        for mode in [part for part in ("quick", "grid") if part in args.parts]:
            options = VerifyOptions(steps=STEPS, size=SIZE, device=args.device, dtype=args.dtype, quick=mode == "quick")
            verifier = Verifier(single, options, hasher, tmp / f"cache-{mode}")
            loras = sorted(tmp.glob("lora-*.safetensors")) or write_loras(verifier.loaded.pipe.unet, tmp, args.files)
            pipe = verifier.loaded.pipe
            cond = verifier._condition(verifier.loaded, "a photo of a cat", {})
            noise = denoise.seeded_noise(pipe, verifier.size, 0)
            t = torch.tensor(FIXED_TIMESTEP, device=device)
            with torch.no_grad():
                forward = statistics.median(timed(lambda: denoise.unet_prediction(pipe.unet, noise, t, cond), sync)
                                            for _ in range(3))
                bare_render = timed(lambda: verifier._render(verifier.loaded, "a photo of a cat", 1, {}), sync) \
                    if mode == "grid" else None
            per_file = [timed(lambda lora=lora: verifier.verify(lora, tmp / f"{lora.stem}.png"), sync) for lora in loras]
            steady = statistics.median(per_file[1:]) if len(per_file) > 1 else per_file[0]
            images = len(options.multipliers)
            line = (f"{mode}: bare forward {forward:.3f} s; per file first {per_file[0]:.2f} s (pays the base), "
                    f"median of the rest {steady:.2f} s = {steady / forward:.2f} bare forwards")
            if bare_render is not None:
                line += (f"; bare render {bare_render:.2f} s, {images} images per grid -> "
                         f"{steady / (images * bare_render):.2f}x bare sampling (target <= 1.3)")
            else:
                line += " (target <= 4)"
            print(f"{line}; {load_average()}", flush=True)
            del verifier, pipe, cond
            gc.collect()
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
