"""`adapterzoo demo`: the whole tour on a built-in tiny model, offline, in a folder of its own.

The tour uses a registry inside that folder, so it never touches the user's own registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterzoo.demo_library import build_library
from adapterzoo.devices import pick_device
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.convert import convert
from adapterzoo.formats.probe import probe
from adapterzoo.ops.extract import extract_lora
from adapterzoo.ops.lowrank import Rank
from adapterzoo.ops.merge_checkpoint import LoraSpec, merge_checkpoint
from adapterzoo.ops.resize import resize_lora
from adapterzoo.verify.compose import Composition
from adapterzoo.verify.sample import SampleOptions, sample
from adapterzoo.verify.verifier import VerifyOptions
from adapterzoo.verify_library import verify_library
from adapterzoo.zoo.db import connect
from adapterzoo.zoo.hashing import sha256_of
from adapterzoo.zoo.queries import list_entries
from adapterzoo.zoo.scan import scan_paths

SCAN_COLUMNS = ["kind", "base", "format", "rank", "alpha", "autov2", "status", "name"]
CONVERT_COLUMNS = ["kind", "from", "to", "output", "probed as"]
OPS_COLUMNS = ["step", "output", "result"]
VERIFY_COLUMNS = ["verdict", "kind", "name", "why"]
VERIFY_STEPS = 2  # the tiny model renders 64x64; two steps prove loading and effect as well as twenty
SAMPLE_STEPS, SAMPLE_PROMPT = 4, "a photo of a cat"
MERGE_WEIGHT, RESIZED_RANK = 0.8, 2
LORA = "Lora/tiny-sd1-style.safetensors"
# (input under models/, output name, --to): one conversion per kind the tiny library holds.
CONVERSIONS = [
    ("Stable-diffusion/tiny-sd1", "tiny-sd1.safetensors", "ldm"),
    ("embeddings/tiny-token.pt", "tiny-token.safetensors", "kohya"),
    ("hypernetworks/tiny-hypernetwork.pt", "tiny-hypernetwork.safetensors", "safetensors"),
]


@dataclass
class DemoStep:
    """One stage of the tour: a title, the command a user would type, and what it shows."""

    title: str
    command: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def run_demo(root: Path, show: Callable[[DemoStep], None]) -> None:
    """Build the tiny library under `root`, then run each stage and hand it to `show` as it completes."""
    if root.exists() and any(root.iterdir()):
        raise AdapterzooError(f"{root} is not empty; the demo writes only into a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny models gain nothing from threads; on busy cores OpenMP hand-offs cost 10x
    models = build_library(root)
    show(DemoStep("A model library like an A1111 user's, built from a tiny SD1 model",
                  f"ls {models}", lines=sorted(str(p.relative_to(root)) for p in models.glob("*/*"))))

    engine = connect(f"sqlite:///{root / 'registry.sqlite'}")
    report = scan_paths([models], engine)
    rows = [entry.to_json() for entry in list_entries(engine)]
    problems = [f"{p['status']}: {Path(p['path']).name}: {p['error']}" for p in report.problems]
    show(DemoStep("Index it: what each file is, its base model and hashes, and what is broken or unsafe",
                  f"adapterzoo --db {root / 'registry.sqlite'} scan {models}",
                  rows=rows, columns=SCAN_COLUMNS, lines=[*problems, report.summary()]))

    converted = root / "converted"
    converted.mkdir()
    checkpoint = models / CONVERSIONS[0][0]
    lora = models / LORA
    rows = []
    for source, name, to in CONVERSIONS:
        report = convert(models / source, converted / name, to)
        found = probe(converted / name)
        rows.append({"kind": report["kind"], "from": report["from"], "to": to, "output": name,
                     "probed as": f"{found.kind} {found.base} {found.format}"})
    # The LoRA was made for the tiny model, so its names resolve against that model, not the SD1.5 tables.
    report = convert(lora, converted / "tiny-sd1-style.diffusers.safetensors", "diffusers", checkpoint=checkpoint)
    found = probe(report["output"])
    rows.append({"kind": "lora", "from": report["from"], "to": "diffusers", "output": Path(report["output"]).name,
                 "probed as": f"{found.kind} {found.base} {found.format}"})
    show(DemoStep("Convert: a diffusers folder to one A1111 file, an A1111 embedding to kohya, a hypernetwork "
                  "to safetensors, the kohya LoRA to what diffusers loads", f"adapterzoo convert {models / CONVERSIONS[0][0]} -o {converted / CONVERSIONS[0][1]} "
                  f"--to {CONVERSIONS[0][2]}", rows=rows, columns=CONVERT_COLUMNS))

    ops = root / "ops"
    ops.mkdir()
    device = pick_device("auto")
    merged = merge_checkpoint(checkpoint, [LoraSpec(lora, MERGE_WEIGHT)], ops / "tiny-sd1-styled",
                              sha256=sha256_of, device=device)
    resized = resize_lora(lora, ops / "tiny-sd1-style.rank2.safetensors", Rank(RESIZED_RANK), device, sha256_of)
    extracted = extract_lora(checkpoint, ops / "tiny-sd1-styled", ops / "tiny-sd1-style.extracted.safetensors",
                             4, device, sha256_of)
    rows = [
        {"step": f"merge --lora {lora.name}:{MERGE_WEIGHT}", "output": "tiny-sd1-styled/",
         "result": f"{merged['tensors_merged']} weights changed, {merged['tensors_copied']} copied as they were"},
        {"step": f"resize --rank {RESIZED_RANK}", "output": Path(resized["output"]).name,
         "result": f"{len(resized['modules'])} modules, {resized['retained_fro']:.1%} of the delta kept"},
        {"step": "extract BASE MERGED --rank 4", "output": Path(extracted["output"]).name,
         "result": f"{len(extracted['modules'])} modules, {extracted['retained_fro']:.4%} of the difference kept"},
    ]
    show(DemoStep(f"Merge the LoRA into the checkpoint, resize its rank, and extract it back out (on {device.type})",
                  f"adapterzoo merge {checkpoint} --lora {lora}:{MERGE_WEIGHT} -o {ops / 'tiny-sd1-styled'}",
                  rows=rows, columns=OPS_COLUMNS))

    out = root / "verify"
    library = verify_library(engine, VerifyOptions(steps=VERIFY_STEPS), out, sha256_of, checkpoints=True,
                             progress_bar=False)
    rows = [{"verdict": r["verdict"], "kind": r["kind"], "name": Path(r["file"]).name, "why": "; ".join(r["reasons"])}
            for r in library.results]
    show(DemoStep("Verify every file: render it at multipliers 0, 0.5, 1 and judge it (the untrained LoRA loads "
                  "and does nothing)", f"adapterzoo --db {root / 'registry.sqlite'} verify --registry --out-dir {out}",
                  rows=rows, columns=VERIFY_COLUMNS,
                  lines=[library.summary(), f"contact sheet {out / 'index.html'}"]))

    pair = [(lora, MERGE_WEIGHT), (Path(extracted["output"]), MERGE_WEIGHT)]
    image = root / "sample" / "switch.png"
    image.parent.mkdir()
    report = sample(checkpoint, SampleOptions(SAMPLE_PROMPT, pair, steps=SAMPLE_STEPS,
                                              composition=Composition("switch", switch_every=1)),
                    image, sha256_of)
    show(DemoStep("Compose two LoRAs while sampling: LoRA Switch hands each step to one of them in turn",
                  f"adapterzoo sample --checkpoint {checkpoint} --lora {lora}:{MERGE_WEIGHT} "
                  f"--lora {extracted['output']}:{MERGE_WEIGHT} --prompt '{SAMPLE_PROMPT}' --compose switch "
                  f"--switch-every 1 --steps {SAMPLE_STEPS} -o {image}",
                  lines=[f"LoRA per pass of the loop: {report['schedule']}", f"wrote {image}"]))
