"""Read a file of any adapter kind and hook it into the loaded pipeline, with what is known before rendering.

Coverage of the keys is settled here (which keys land on a module of this checkpoint), as are the
problems a file shows before a single step: NaN or inf in its tensors, an embedding's width, a
LoRA whose every up factor is zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.embedding_convert import read_embedding
from adapterzoo.formats.hypernetwork_convert import read_hypernetwork
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.lora.lora_model import LoraFile, LoraModule
from adapterzoo.formats.lora.lora_read import load_lora_matched, misfit_example
from adapterzoo.formats.model.architectures import builtin_architecture
from adapterzoo.formats.model.registry import family_of
from adapterzoo.verify.denoise import Insert
from adapterzoo.verify.pipeline_load import LoadedPipeline
from adapterzoo.verify.runtime_embedding import AppliedEmbedding, apply_embedding, slot_encoders, width_problems
from adapterzoo.verify.runtime_hypernetwork import AppliedHypernetwork, apply_hypernetwork, attention_widths
from adapterzoo.verify.runtime_lora import AppliedLora, apply_lora, live_modules

ADAPTER_KINDS = ("lora", "lycoris", "hypernetwork", "embedding")
POSITIONAL_DIALECTS = ("cloneofsimo",)  # pairs numbered by position in the standard model, not named


Handle = AppliedLora | AppliedHypernetwork | AppliedEmbedding


@dataclass
class Attached:
    """A file read and ready: `hook()` puts it into the model (the model without it renders first), then set
    `handle.multiplier`, render, read `handle.calls`, and `handle.remove()`."""

    apply: Callable[[], Handle]
    coverage: dict  # keys_total, keys_matched, modules_total, unmatched (modules_hit filled after rendering)
    problems: list[str] = field(default_factory=list)  # fail reasons known before rendering
    no_effect: str | None = None  # why the file cannot change anything, when that is known from its tensors
    token: str | None = None  # an embedding's prompt word
    handle: Handle | None = None

    def hook(self) -> Handle:
        self.handle = self.apply()
        return self.handle

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()

    def insert(self) -> Insert:
        return self.handle.insert() if isinstance(self.handle, AppliedEmbedding) else {}

    def without(self, prompt: str) -> str:
        """The prompt the model without the file gets: an embedding's token taken out."""
        if self.token is None:
            return prompt
        return " ".join(prompt.replace(self.token, " ").split()).strip(" ,")

    def at(self, prompt: str, multiplier: float) -> str:
        return self.without(prompt) if multiplier == 0 else prompt


def _tensors(module: object) -> list[torch.Tensor]:
    return [v for v in vars(module).values() if isinstance(v, torch.Tensor)]


def _nonfinite(named: dict[str, list[torch.Tensor]]) -> str | None:
    bad = [name for name, tensors in named.items() if not all(bool(torch.isfinite(t).all()) for t in tensors)]
    if not bad:
        return None
    return f"NaN or inf in the file's tensors ({len(bad)} module(s), e.g. {bad[0]})"


def _attach_lora(file: Path, found: ProbeResult, loaded: LoadedPipeline) -> Attached:
    architecture = builtin_architecture(loaded.base) if found.format in POSITIONAL_DIALECTS else loaded.architecture
    lora, unmatched, misfits = load_lora_matched(file, architecture)
    lora = lora or LoraFile({}, architecture, str(found.format))
    modules = live_modules(loaded.models, architecture, list(lora.modules))
    absent = [path for path, module in modules.items() if module is None]
    present = {path: module for path, module in modules.items() if module is not None}
    missing_keys = sum(len(_tensors(lora.modules[path])) for path in absent)
    coverage = {"keys_total": found.tensors,
                "keys_matched": max(0, found.tensors - len(unmatched) - missing_keys),
                "modules_total": len(present),
                "unmatched": unmatched + [f"{path} (no such layer in the checkpoint)" for path in absent]}
    problems = [p for p in [_nonfinite({path: _tensors(m) for path, m in lora.modules.items()})] if p]
    if misfits:
        problems.append(f"{sum(len(m.keys) for m in misfits)} key(s) name modules of the checkpoint but not their "
                        f"shapes (e.g. {misfit_example(misfits, loaded.base)}): a LoRA for another model?")
    ups = [m.up for m in lora.modules.values() if isinstance(m, LoraModule)]
    only_lora = len(ups) == len(lora.modules) > 0
    no_effect = "every lora_up is zero" if only_lora and not any(bool(u.any()) for u in ups) else None
    return Attached(lambda: apply_lora(lora, present), coverage, problems, no_effect)


def _attach_hypernetwork(file: Path, loaded: LoadedPipeline) -> Attached:
    hypernetwork, _, _ = read_hypernetwork(file)
    widths = set(attention_widths(loaded.pipe.unet).values())
    stray = sorted(w for w in hypernetwork.layers if w not in widths)
    stray_keys = sum(len(m) for w in stray for m in hypernetwork.layers[w])
    hooked = [w for w in attention_widths(loaded.pipe.unet).values() if w in hypernetwork.layers]
    coverage = {"keys_total": hypernetwork.tensor_count, "keys_matched": hypernetwork.tensor_count - stray_keys,
                "modules_total": len(hooked),
                "unmatched": [f"width {w} (no attention of this checkpoint reads a context that wide)" for w in stray]}
    tensors = {f"width {w}": [t for m in pair for t in m.values()] for w, pair in hypernetwork.layers.items()}
    problems = [p for p in [_nonfinite(tensors)] if p]
    return Attached(lambda: apply_hypernetwork(hypernetwork, loaded.pipe.unet), coverage, problems)


def _attach_embedding(file: Path, found: ProbeResult, loaded: LoadedPipeline) -> Attached:
    """Each slot of the file acts on the text encoder its family names for it (CLIP-L, CLIP-G, T5); a slot whose
    encoder this pipeline lacks is a key that lands nowhere."""
    embedding, fmt, _ = read_embedding(file)
    token = embedding.name if fmt == "diffusers" and embedding.name else file.stem
    family = family_of(loaded.base)
    slots = family.sampling.embedding_slots if family is not None and family.sampling is not None else None
    landed, missing = slot_encoders(embedding, slots, loaded.models)
    problems = width_problems(embedding, landed, loaded.models)
    nonfinite = _nonfinite({part: [vectors] for part, vectors in embedding.parts.items()})
    problems += [nonfinite] if nonfinite else []
    keys = found.tensors
    matched = 0 if problems else round(keys * len(landed) / len(embedding.parts))  # one tensor a slot, bar a1111's
    coverage = {"keys_total": keys, "keys_matched": matched,
                "modules_total": 0 if problems else len(landed), "unmatched": missing}

    def apply() -> AppliedEmbedding:
        if problems:
            return AppliedEmbedding(token, {})
        return apply_embedding(embedding, token, landed, loaded.models)

    return Attached(apply, coverage, problems, token=token)


def attach(file: Path, found: ProbeResult, loaded: LoadedPipeline) -> Attached:
    """Hook `file` (probed as `found`) into `loaded`; BadFileError if it cannot be read."""
    if found.kind in ("lora", "lycoris"):
        return _attach_lora(file, found, loaded)
    if found.kind == "hypernetwork":
        return _attach_hypernetwork(file, loaded)
    if found.kind == "embedding":
        return _attach_embedding(file, found, loaded)
    raise BadFileError(f"{file.name} is a {found.kind}, not an adapter")
