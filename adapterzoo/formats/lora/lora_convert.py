"""`convert` for LoRA-family files: read into the canonical form, write one dialect, report what happened."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.atomic import atomic_output, check_output
from adapterzoo.formats.lora.lora_approx import approximate, bias_left_out
from adapterzoo.formats.lora.lora_metadata import output_metadata
from adapterzoo.formats.lora.lora_model import FullModule, Ia3Module, LoraFile, LoraModule
from adapterzoo.formats.lora.lora_read import PEFT_CONFIG, PEFT_WEIGHTS, load_lora
from adapterzoo.formats.lora.lora_write import (
    diffusers_tensors,
    kohya_tensors,
    peft_adapters,
)
from adapterzoo.formats.model.registry import families, family_of, lora_targets
from adapterzoo.formats.model.targets import Architecture


def dialect_tensors(lora: LoraFile, to: str) -> dict[str, torch.Tensor]:
    """A kohya or family dialect's tensors: the base's family writes its own module space where it has one
    (BFL names with fused projections), else the common kohya writer names the canonical modules."""
    family = family_of(lora.base)
    writer = family.lora_writers.get(to) if family is not None else None
    if writer is not None:
        return writer(lora)
    if to == "kohya":
        return kohya_tensors(lora)
    writers = [family.title for family in families() if to in family.lora_writers]
    raise AdapterzooError(f"{to} names exist for {' and '.join(writers)} LoRAs only; this one is for {lora.base}")


def convert_lora(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    to: str,
    *,
    base: str | None = None,
    force: bool = False,
    rank: int | None = None,
    architecture: Architecture | None = None,
) -> dict[str, Any]:
    """Write `src` as `to` (kohya | diffusers | peft, or a family's own dialect) at `dest`; `rank` approximates
    LyCORIS modules by SVD."""
    if to not in lora_targets():
        raise AdapterzooError(f"a LoRA converts to {' | '.join(lora_targets())}, not {to!r}")
    dest = check_output(dest, [src], force, folder=to == "peft")
    if to != "peft" and dest.suffix != ".safetensors":
        raise AdapterzooError(f"a {to} LoRA is a .safetensors file; name the output *.safetensors")
    lora = load_lora(src, base, architecture)
    bias_warning = bias_left_out(list(lora.modules.values())) if rank is not None else None
    approximation = _make_plain(lora, to, rank)
    embedding_paths = _embedding_paths(lora, dest, src, force)
    metadata = output_metadata(lora, to, dest.stem, rank if approximation else None)
    if to not in ("diffusers", "peft"):
        tensors = dialect_tensors(lora, to)
        with atomic_output(dest) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    elif to == "diffusers":
        tensors, header = diffusers_tensors(lora)
        with atomic_output(dest) as tmp:
            save_file(tensors, str(tmp), metadata={**metadata, **header})
    else:
        _write_peft(lora, dest, metadata)
    for token, path in embedding_paths.items():
        with atomic_output(path) as tmp:
            save_file({token: lora.embeddings[token].contiguous()}, str(tmp))
    report: dict[str, Any] = {
        "input": str(src), "output": str(dest), "format": to, "source_format": lora.source_format,
        "base": lora.base, "modules": len(lora.modules), "components": lora.components(),
    }
    if embedding_paths:
        report["embeddings"] = {token: str(path) for token, path in embedding_paths.items()}
    if approximation:
        report["approximation"] = approximation
    if bias_warning:
        report["warnings"] = [bias_warning]
    return report


def _make_plain(lora: LoraFile, to: str, rank: int | None) -> dict[str, Any] | None:
    """Replace LoHa/LoKr/full modules by rank-N LoRAs where asked or needed; None if nothing changed. A norm
    layer's full module (1-D) has no LoRA form: kohya keeps it as it is, the other dialects cannot hold it."""
    norms = [p for p, m in lora.modules.items() if isinstance(m, FullModule) and len(m.shape) == 1]
    if norms and to != "kohya":
        raise AdapterzooError(f"{len(norms)} norm-layer change(s) (e.g. {norms[0]}) have no LoRA form; only "
                              "--to kohya keeps them")
    lycoris = {p: m for p, m in lora.modules.items() if not isinstance(m, LoraModule) and p not in norms}
    if any(isinstance(m, Ia3Module) for m in lycoris.values()) and (to != "kohya" or rank is not None):
        raise AdapterzooError("IA3 modules scale the base weights themselves; they cannot become a LoRA without them")
    if rank is None:
        if lycoris and to != "kohya":
            raise AdapterzooError(
                f"{len(lycoris)} LyCORIS (LoHa/LoKr/IA3/full) modules cannot be written as {to} exactly; "
                "pass --rank N to approximate them by SVD as rank-N LoRAs"
            )
        return None
    if not lycoris:
        raise AdapterzooError("--rank only approximates LyCORIS (LoHa/LoKr/full) modules and this file has none")
    per_module: dict[str, float] = {}
    kept = total = 0.0
    for path, module in lycoris.items():
        result = approximate(module, rank)
        lora.modules[path] = result.module
        per_module[path] = result.retained
        kept, total = kept + result.kept, total + result.total
    overall = math.sqrt(kept / total) if total > 0 else 1.0
    return {"rank": rank, "retained_fro": overall, "modules": per_module}


def _embedding_paths(lora: LoraFile, dest: Path, src: str | os.PathLike, force: bool) -> dict[str, Path]:
    """Embedded tokens go beside the output, one diffusers learned_embeds file per token (its loader
    and A1111's take exactly one token per file): `<out stem>.<token letters>.safetensors`."""
    slugs = {token: re.sub(r"[^A-Za-z0-9_-]", "", token) for token in sorted(lora.embeddings)}
    if len(set(slugs.values())) < len(slugs) or not all(slugs.values()):
        slugs = {token: f"token{i}" for i, token in enumerate(slugs)}
    return {token: check_output(dest.with_name(f"{dest.stem}.{slug}.safetensors"), [src], force)
            for token, slug in slugs.items()}


def _write_peft(lora: LoraFile, dest: Path, metadata: dict[str, str]) -> None:
    """One PEFT folder; with several components, one PEFT folder per component inside it."""
    adapters, record = peft_adapters(lora)
    with atomic_output(dest, folder=True) as tmp:
        for component, (tensors, config) in adapters.items():
            folder = tmp if len(adapters) == 1 else tmp / component
            folder.mkdir(exist_ok=True)
            save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={**metadata, **record, "format": "pt"})
            (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
