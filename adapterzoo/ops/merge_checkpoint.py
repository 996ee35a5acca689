"""`merge`: LoRA-family files into a checkpoint's weights, streamed tensor by tensor (FORMATS.md §1.5, §2.3).

Every LoRA is resolved against the checkpoint's own modules (`checkpoint_targets`), all of it
before a byte is written. Then each stored tensor is read, and if LoRAs land on it, changed in
fp32 on the device: plain LoRAs aimed at one weight become one GEMM over their concatenated
factors (each weight·scale folded into its up factor), LoHa/LoKr/full deltas are added, and
weight-dependent modules (DoRA, IA3) are applied in --lora order to the weight as it stands, as
fusing them one after the other would. Untouched tensors are copied as they are, as bytes, by the
kernel where the input is safetensors. The output is a temporary file (or folder) beside OUT, renamed
into place only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.checkpoint_targets import (
    SINGLE_FILE,
    CheckpointTargets,
    WeightLocation,
    check_lora_base,
    checkpoint_targets,
    probe_targets,
)
from adapterzoo.formats.io.atomic import atomic_output, check_output
from adapterzoo.formats.io.pickle_safe import PICKLE_SUFFIXES
from adapterzoo.formats.io.safetensors_writer import PlannedTensor, write_order, write_safetensors
from adapterzoo.formats.io.tensor_source import OrderedViews, TensorSource, open_checkpoint_file
from adapterzoo.formats.lora.lora_keys import detect_lora_dialect, group_modules
from adapterzoo.formats.lora.lora_model import AdapterModule, FullModule, Ia3Module, LoraFile, LoraModule
from adapterzoo.formats.lora.lora_parts import is_text_encoder_module
from adapterzoo.formats.lora.lora_read import Misfit, load_lora_matched, misfit_example
from adapterzoo.formats.members import check_members, declared
from adapterzoo.formats.model.targets import TEXT_ENCODERS, UNET
from adapterzoo.ops.provenance import Hasher, Source, provenance_metadata

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
METHOD = "W + sum(weight * delta W), fp32; LoRA factors concatenated per weight; DoRA/IA3 in --lora order"
SHA256_HEX = 64
PENDING = "pending-sha256-"  # header placeholder, numbered and padded to exactly SHA256_HEX characters
SHOWN_KEYS = 5
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_SCALES = ("scale_weight", "weight_scale", "comfy_quant", "input_scale")  # per-tensor scales beside a weight
FP8_MARKER = "scaled_fp8"  # ComfyUI's scaled-fp8 files carry it


@dataclass(frozen=True)
class LoraSpec:
    """One --lora FILE[:W]: a LoRA-family file or PEFT folder and its multiplier."""

    path: Path
    weight: float = 1.0


class UnmatchedLoraKeysError(AdapterzooError):
    """LoRA keys that land on no weight of the checkpoint; all of them go to --json. A text-encoder part that
    meets a UNet or transformer alone is named as such: its keys are fine, the checkpoint just has nothing for them."""

    def __init__(self, lora: Path, checkpoint: Path, keys: list[str], text_encoder_keys: list[str],
                 misfits: list[Misfit], alone: str = "a UNet alone") -> None:
        self.lora, self.keys = lora, keys
        text = set(text_encoder_keys)
        rest = [k for k in keys if k not in text]
        said = [f"{len(rest)} key(s) land on no weight of {checkpoint.name}: {_shown(rest)}"] if rest else []
        if (named := sum(len(m.keys) for m in misfits)) and said:
            said[-1] += (f"; {named} of them name weights of it but not their shapes (e.g. "
                         f"{misfit_example(misfits, checkpoint.name)}): a LoRA for another model?")
        if text_encoder_keys:
            dialect = detect_lora_dialect(text_encoder_keys)
            modules = list(group_modules(text_encoder_keys, dialect)) if dialect else text_encoder_keys
            said.append(f"its text-encoder part ({len(modules)} module(s): {_shown(modules)}) has nowhere to go "
                        f"in {checkpoint.name}, {alone}")
        hint = "merges the rest" if rest else f"merges the {alone.split()[1]} part alone"
        super().__init__(f"{lora.name}: {'; '.join(said)} (--allow-unmatched {hint})")

    def json_details(self) -> dict:
        return {"lora": str(self.lora), "unmatched": self.keys}


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")


@dataclass
class _Patch:
    """Everything landing on one target inside one stored tensor, in --lora order."""

    location: WeightLocation
    shape: tuple[int, ...]  # the target module's weight shape
    on_bias: bool
    modules: list[tuple[AdapterModule, float]] = dataclasses.field(default_factory=list)


def merge_checkpoint(
    checkpoint: str | os.PathLike,
    loras: Sequence[LoraSpec],
    dest: str | os.PathLike,
    *,
    sha256: Hasher,
    device: torch.device | None = None,
    dtype: str | None = None,
    allow_unmatched: bool = False,
    allow_variant_mismatch: bool = False,
    force: bool = False,
    progress_bar: bool = False,
) -> dict[str, Any]:
    """Merge `loras` into `checkpoint` (single file, diffusers folder, or a UNet alone), written to `dest` in
    the same layout.

    `sha256(path)` gives an input's digest for the provenance metadata (`ops.provenance`); for files it
    runs in a background thread while the tensors stream, since hashing a checkpoint takes seconds.
    `dtype` (fp16, bf16, fp32) casts every floating tensor; by default each keeps its own. Raises
    AdapterzooError before writing anything for a bad input, a LoRA declaring another member of the family than
    the checkpoint (or another LoRA) among them unless `allow_variant_mismatch` (`formats.members`: a warning
    then). `progress_bar` shows the bytes written on stderr.
    """
    started = time.perf_counter()
    device = device or torch.device("cpu")
    if dtype is not None and dtype not in DTYPES:
        raise AdapterzooError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if not loras:
        raise AdapterzooError("no LoRA given: pass at least one --lora FILE[:W]")
    checkpoint, dest = Path(checkpoint), Path(dest)
    targets = checkpoint_targets(checkpoint)
    _check_paths(checkpoint, dest, [spec.path for spec in loras], force)
    merger = _Merger(device, DTYPES.get(dtype) if dtype else None)
    merger.warnings += _check_loras(targets, loras, allow_variant_mismatch)
    read = [_read_lora(spec, targets, allow_unmatched, merger.warnings) for spec in loras]
    patches = _patches(targets, [(lora, spec.weight) for lora, spec in zip(read, loras)], merger.warnings)
    files = _files_to_write(targets, patches, merger.warnings)
    plans = [(source, name, *merger.plan(source, patches.get(file, {}), targets)) for source, name, file in files]
    hashes = _Hashes([f for f, _, _ in files] + [spec.path for spec in loras], sha256)
    total = sum(item.nbytes for _, _, plan, _ in plans for item in plan)
    with (atomic_output(dest, folder=targets.is_folder) as tmp, _core_left_for_other_threads(),
          contextlib.closing(merger), tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None if progress_bar else True) as bar):
        written = []
        if targets.is_folder:
            _copy_untouched(checkpoint, tmp, {file for _, _, file in files})
        for source, name, plan, kept in plans:
            out = tmp / name if targets.is_folder else tmp
            metadata = _provenance(hashes, source, checkpoint, loras, device, dtype)
            write_safetensors(out, plan, {**kept, "format": "pt", **metadata}, progress=bar.update)
            written.append(out)
        digests = hashes.wait()
        for out in written:
            _fill_placeholders(out, digests)
    return {
        "checkpoint": str(checkpoint), "base": targets.base, "output": str(dest),
        "layout": "diffusers" if targets.is_folder else "single-file",
        "loras": [_lora_report(spec, lora) for spec, lora in zip(loras, read)],
        "tensors_merged": merger.merged, "tensors_copied": merger.copied, "device": str(device),
        "dtype": dtype, "warnings": merger.warnings, "seconds": round(time.perf_counter() - started, 3),
    }


# -- checking and reading the inputs ----------------------------------------------------------------


def _check_paths(src: Path, dest: Path, loras: list[Path], force: bool) -> None:
    check_output(dest, [src, *loras], force, folder=src.is_dir())
    source, target = src.resolve(), dest.resolve()
    if src.is_dir():
        if target.is_relative_to(source) or source.is_relative_to(target):
            raise AdapterzooError(f"output {dest} and the input folder {src} overlap; write it elsewhere")
        marker = "model_index.json" if (src / "model_index.json").is_file() else "config.json"
        kind = "diffusers pipeline" if marker == "model_index.json" else "UNet"
        if dest.exists() and not (dest / marker).is_file():
            raise AdapterzooError(f"{dest} exists and is not a {kind} folder ({marker}); refusing to replace it")
    else:
        if dest.suffix.lower() != ".safetensors":
            raise AdapterzooError(f"output {dest.name} must end in .safetensors (pickles are never written)")
        if dest.exists() and not dest.is_file():
            raise AdapterzooError(f"{dest} exists and is not a file; refusing to replace it")


@dataclass
class _Read:
    lora: LoraFile | None  # None: nothing of the file landed anywhere (--allow-unmatched)
    unmatched: list[str]


def _check_loras(targets: CheckpointTargets, loras: Sequence[LoraSpec], allow: bool) -> list[str]:
    """Every LoRA exists and is for the checkpoint's base (`check_lora_base`, whose probes serve again here), and no
    two files declare different members the weights cannot tell apart (the checkpoint is probed only when a LoRA
    declares one); returns the warnings `allow` leaves of those refusals."""
    found = []
    for spec in loras:
        if not spec.path.exists():
            raise AdapterzooError(f"LoRA {spec.path} does not exist")
        found.append((spec.path, check_lora_base(targets, spec.path)))
    if not any(declared(probed) for _, probed in found):
        return []
    return check_members([(targets.path, probe_targets(targets)), *found], allow)


def _read_lora(spec: LoraSpec, targets: CheckpointTargets, allow_unmatched: bool, warnings: list[str]) -> _Read:
    """The LoRA resolved against the checkpoint's modules; with allow_unmatched, minus what lands nowhere."""
    lora, unmatched, misfits = load_lora_matched(spec.path, targets.architecture)
    homeless = [path for path in lora.modules if path not in targets.locations] if lora else []
    # a checkpoint without text encoders: their LoRA keys are unmatched (a UNet's table lacks them) or, where
    # the family knows its encoders without the checkpoint (Flux's CLIP-L), resolved to modules with no weight
    held = {targets.architecture.targets[path].component for path in targets.locations}
    alone = f"a {'UNet' if UNET in held else 'transformer'} alone"
    no_encoder = not held & set(TEXT_ENCODERS)
    text_encoder_keys = [k for k in unmatched if no_encoder and is_text_encoder_module(k)]
    text_encoder_keys += [p for p in homeless if no_encoder and targets.architecture.targets[p].component in TEXT_ENCODERS]
    if (unmatched or homeless) and not allow_unmatched:
        raise UnmatchedLoraKeysError(spec.path, targets.path, unmatched + homeless, text_encoder_keys, misfits, alone)
    if text_encoder_keys:
        warnings.append(f"{spec.path.name}: its text-encoder part ({len(text_encoder_keys)} key(s)) is left out, "
                        f"{targets.path.name} is {alone}")
    for path in homeless:
        del lora.modules[path]
    if lora is not None and lora.embeddings:
        warnings.append(f"{spec.path.name}: its embedded tokens ({', '.join(sorted(lora.embeddings))}) are "
                        "not merged; `convert` writes them out as embeddings")
    return _Read(lora, unmatched + homeless)


def _patches(
    targets: CheckpointTargets, loras: list[tuple[_Read, float]], warnings: list[str]
) -> dict[str, dict[str, list[_Patch]]]:
    """file -> stored key -> the patches landing on it, every target's modules in --lora order."""
    by_target: dict[tuple[str, bool], _Patch] = {}
    for read, weight in loras:
        for path, module in (read.lora.modules if read.lora else {}).items():
            location, shape = targets.locations[path], targets.architecture.targets[path].shape
            by_target.setdefault((path, False), _Patch(location, shape, False)).modules.append((module, weight))
            if isinstance(module, FullModule) and module.diff_b is not None:
                if location.bias is None:
                    warnings.append(f"{path}: the bias delta is left out, the checkpoint stores no bias for it")
                    continue
                by_target.setdefault((path, True), _Patch(location, shape, True)).modules.append((module, weight))
    out: dict[str, dict[str, list[_Patch]]] = {}
    for patch in by_target.values():
        key = patch.location.bias if patch.on_bias else patch.location.key
        out.setdefault(patch.location.file, {}).setdefault(key, []).append(patch)
    return out


# -- which files are written ------------------------------------------------------------------------


def _files_to_write(
    targets: CheckpointTargets, patches: dict[str, dict[str, list[_Patch]]], warnings: list[str]
) -> list[tuple[Path, str, str]]:
    """(input file, output name, WeightLocation.file) of every weight file to rewrite; a folder's others are
    copied as they are. A pipeline's weights live in component folders, a UNet folder's in itself."""
    if not targets.is_folder:
        return [(targets.path, targets.path.name, SINGLE_FILE)]
    files = []
    for component in patches:
        folder = targets.path / component
        weights = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
        where = component or targets.path.name
        if not weights:
            raise AdapterzooError(f"{where} holds pickled weights only; merging writes safetensors, so save "
                                  "it with safe_serialization=True first")
        files += [(p, p.relative_to(targets.path).as_posix(), component) for p in weights]
        for stale in sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES):
            warnings.append(f"{stale.relative_to(targets.path).as_posix()} left out: pickled weights are never "
                            "rewritten, the merged safetensors replace them")
    return files


def _copy_untouched(src: Path, tmp: Path, touched: set[str]) -> None:
    """Copy the folder, leaving out the weight files in touched folders (they are rewritten); "" is `src` itself."""
    folders = {src / name for name in touched}

    def weights(folder: str, names: list[str]) -> list[str]:
        if Path(folder) not in folders:
            return []
        return [n for n in names if n.endswith(".safetensors") or Path(n).suffix.lower() in PICKLE_SUFFIXES]

    shutil.copytree(src, tmp, ignore=weights, dirs_exist_ok=True)


# -- streaming tensors --------------------------------------------------------------------------


def _on(module: AdapterModule, device: torch.device) -> AdapterModule:
    """The module with its tensors on `device` (LoRA factors are small; the weight never leaves it)."""
    if device.type == "cpu":
        return module
    moved = {f.name: getattr(module, f.name).to(device) for f in dataclasses.fields(module)
             if isinstance(getattr(module, f.name), torch.Tensor)}
    return dataclasses.replace(module, **moved)


def _accumulate(current: torch.Tensor, modules: list[tuple[AdapterModule, float]], device: torch.device) -> None:
    """current += each module's delta · multiplier, in place; runs of plain LoRAs become one GEMM."""
    ups: list[torch.Tensor] = []
    downs: list[torch.Tensor] = []

    def flush() -> None:
        if ups:
            current.view(current.shape[0], -1).addmm_(torch.cat(ups, dim=1), torch.cat(downs, dim=0))
            ups.clear()
            downs.clear()

    for module, weight in modules:
        module = _on(module, device)
        if isinstance(module, LoraModule) and module.dora_scale is None:
            ups.append(module.up.float().flatten(1) * (weight * module.scale))
            downs.append(module.full_down().float().flatten(1))
        elif isinstance(module, Ia3Module) or getattr(module, "dora_scale", None) is not None:
            flush()  # these depend on the weight, so everything before them must be in it
            current.add_(module.delta(current), alpha=weight)
        else:
            current.add_(module.delta().reshape(current.shape), alpha=weight)
    flush()


class _Scratch:
    """CPU buffers reused from tensor to tensor. A fresh allocation of many MB is mapped and zero-filled by
    the kernel every time (glibc serves it outside its heap), which costs more than the merge arithmetic."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` whose memory the next take() with the same role and dtype reuses."""
        numel = math.prod(shape)
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(role, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(shape)


def _apply(weight: torch.Tensor, patches: list[_Patch], device: torch.device, scratch: _Scratch) -> torch.Tensor:
    """The stored tensor with every patch applied, in fp32 on `device`."""
    if device.type == "cpu":
        w = scratch.take("work", tuple(weight.shape), torch.float32).copy_(weight)
    else:
        w = weight.to(device).float()
    for patch in patches:
        location = patch.location
        region = location.region(w)
        current = location.as_module(region)
        if patch.on_bias:
            for module, multiplier in patch.modules:
                current.add_(module.diff_b.to(device).float().reshape(current.shape), alpha=multiplier)
        else:
            _accumulate(current.view(patch.shape), patch.modules, device)
        if location.moved:
            region.copy_(location.as_stored(current))
    return w


class _Merger:
    """Plans the merged files' tensors on one device, collecting warnings and counts for the report."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None) -> None:
        self.device = device
        self.dtype = dtype
        self.scratch = _Scratch()
        self.warnings: list[str] = []
        self.merged = 0
        self.copied = 0
        self._views: dict[Path, OrderedViews] = {}  # each weight file's merged tensors, read one ahead

    def _merged(self, source: Path, key: str, patches: list[_Patch], dtype: torch.dtype) -> torch.Tensor:
        """The merged tensor in a reused buffer: valid until the next call (the writer has written it by then)."""
        weight = self._views[source].view(key)
        try:
            merged = _apply(weight, patches, self.device, self.scratch)
        except torch.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.warnings.append(f"{key}: out of {self.device.type} memory, merged on the CPU instead")
            merged = _apply(weight, patches, torch.device("cpu"), self.scratch)
        return self.scratch.take("out", tuple(merged.shape), dtype).copy_(merged)

    def plan(self, source: Path, patches: dict[str, list[_Patch]], targets: CheckpointTargets
             ) -> tuple[list[PlannedTensor], dict[str, str]]:
        """The output tensors of one weight file, merged ones made when written, and the metadata it keeps."""
        reader = open_checkpoint_file(source) if targets.is_folder else targets.sources[SINGLE_FILE]
        _check_fp8(reader, patches, self.dtype, source.name)
        plan = []
        for key, shape in reader.shapes.items():
            if key in patches:
                self.merged += 1
                dtype = reader.output_dtype(key, self.dtype)
                plan.append(PlannedTensor(key, tuple(shape), dtype,
                                          functools.partial(self._merged, source, key, patches[key], dtype)))
            else:
                self.copied += 1
                plan.append(reader.planned(key, key, self.dtype))
        self._views[source] = OrderedViews(reader, [t.name for t in write_order(plan) if t.name in patches])
        kept = {k: v for k, v in reader.metadata.items() if not k.startswith("modelspec.hash_")}  # no longer true
        return plan, kept

    def close(self) -> None:
        """Stop reading ahead (the merge is done, or failed)."""
        for views in self._views.values():
            views.close()


def _check_fp8(reader: TensorSource, patches: dict[str, list[_Patch]], dtype: torch.dtype | None, name: str) -> None:
    """Merging into fp8 weights (README, merge): a LoRA's ΔW is mostly far below fp8's rounding step, so
    merged tensors are written in the dtype --dtype names, never back in fp8; weights stored with scales (ComfyUI's
    scaled fp8, quantized files) would need those applied and are refused."""
    for key in patches:
        stem = key.removesuffix("weight")
        scales = [stem + scale for scale in FP8_SCALES if stem + scale in reader.shapes]
        if scales or FP8_MARKER in reader.shapes:
            raise AdapterzooError(f"{name} stores {key} with a scale ({(scales or [FP8_MARKER])[0]}): scaled fp8 or "
                                  "quantized weights cannot take a LoRA exactly; merge into the bf16 or fp16 release")
        if reader.dtypes[key] in FP8 and dtype is None:
            raise AdapterzooError(f"{name} stores {key} in fp8, which would round most of a LoRA's change away; "
                                  "pass --dtype bf16 (or fp16, fp32) to write the merged checkpoint in that dtype")


# -- provenance -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _core_left_for_other_threads() -> Iterator[None]:
    """One torch CPU thread fewer while the merge's other threads run (the input's SHA-256, the read-ahead and the
    chunk writer of a large file): on 2 cores, three busy threads made the merge of an SD1.5 UNet 1.4x slower
    than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Hashes:
    """SHA256 of the input files, computed in a background thread while the tensors stream (folders,
    only ever small LoRA ones here, are hashed at once).

    Headers are written first, so they carry numbered placeholders as long as a digest, which
    `_fill_placeholders` overwrites in place once the digests are known.
    """

    def __init__(self, paths: list[Path], sha256: Hasher) -> None:
        self._files = list(dict.fromkeys(p for p in paths if not p.is_dir()))
        self._folders = {p: sha256(p) for p in paths if p.is_dir()}
        self._sha256 = sha256
        self._digests: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="merge-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for path in self._files:
                digest = self._sha256(path)
                if not isinstance(digest, str) or len(digest) != SHA256_HEX:
                    raise AdapterzooError(f"the SHA256 of {path.name} came out as {digest!r}")
                self._digests[path] = digest
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by wait()
            self._error = exc

    def of(self, path: Path) -> str | dict[str, str]:
        """The digest to record for `path`: a placeholder for a file, the real digests for a folder."""
        if path in self._folders:
            return self._folders[path]
        number = str(self._files.index(path))
        return PENDING + number.zfill(SHA256_HEX - len(PENDING))

    def wait(self) -> dict[str, str]:
        """placeholder -> digest, once every file is hashed."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return {self.of(path): digest for path, digest in self._digests.items()}


def _fill_placeholders(path: Path, digests: dict[str, str]) -> None:
    with open(path, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = fh.read(length)
        for placeholder, digest in digests.items():
            header = header.replace(placeholder.encode(), digest.encode())
        fh.seek(8)
        fh.write(header)


def _provenance(hashes: _Hashes, source: Path, checkpoint: Path, loras: Sequence[LoraSpec],
                device: torch.device, dtype: str | None) -> dict[str, str]:
    """ModelSpec's merged_from plus our record: enough to redo the merge from the same files. A folder's
    weight file records the one file it was made from, by its path inside the folder."""
    digest = hashes.of(source)
    made_from = {source.relative_to(checkpoint).as_posix(): digest} if checkpoint.is_dir() else digest
    sources = [Source(checkpoint, made_from, role="checkpoint")]
    sources += [Source(spec.path, hashes.of(spec.path), spec.weight, "lora") for spec in loras]
    return provenance_metadata("merge", sources, method=METHOD, device=device.type, dtype=dtype)


def _lora_report(spec: LoraSpec, read: _Read) -> dict[str, Any]:
    lora = read.lora
    return {
        "path": str(spec.path), "weight": spec.weight, "format": lora.source_format if lora else None,
        "modules": len(lora.modules) if lora else 0, "components": lora.components() if lora else {},
        "unmatched": read.unmatched,
    }
