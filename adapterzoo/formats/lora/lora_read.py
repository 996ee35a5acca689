"""Read any LoRA-family file or PEFT folder into the canonical form (`LoraFile`, FORMATS.md §1).

Each dialect only says how its keys group into modules, which module each group names and where
its alpha lives; one builder then checks every group against the real module it lands on (shape
included) and makes the canonical dataclass. A name that spells a fused projection of the family's
own layout (BFL's qkv) is built against the fused shape and split exactly into its parts (`fused`).
Keys that land nowhere are never dropped silently: they are all listed in an `UnmatchedKeysError`,
or handed back by `load_lora_matched`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.pickle_safe import (
    PICKLE_SUFFIXES,
    load_pickle,
    unwrap_state_dict,
)
from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.safetensors_header import read_header, safetensors_errors
from adapterzoo.formats.io.tensor_table import one_number, table_from_state_dict
from adapterzoo.formats.lora.delta_shapes import ShapeMismatch, check_delta_shape
from adapterzoo.formats.lora.fused import split_full, split_fused
from adapterzoo.formats.lora.lora_cloneofsimo import injected_classes, injection_order
from adapterzoo.formats.lora.lora_keys import detect_lora_dialect, split_key
from adapterzoo.formats.lora.lora_model import (
    AdapterModule,
    FullModule,
    Ia3Module,
    LohaModule,
    LokrModule,
    LoraFile,
    LoraModule,
    dora_on_output,
)
from adapterzoo.formats.lora.lora_parts import DIFFUSERS_ADAPTER_METADATA, PEFT_PREFIX
from adapterzoo.formats.lora.probe_lora import config_number, probe_lora
from adapterzoo.formats.model.architectures import builtin_architecture
from adapterzoo.formats.model.registry import bases, family_of
from adapterzoo.formats.model.targets import Architecture, FusedModule, Target

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's default lora_alpha, used when a config leaves it out

_PART_NAMES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
}
# Parts that are factors of ΔW, each at least a matrix (alphas, scales and IA3/DoRA vectors are not).
_FACTOR_PARTS = {"down", "up", "mid", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
# Old diffusers named CLIP attention projections like the UNet's (to_q_lora on self_attn).
_LEGACY_CLIP = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out.0": "out_proj"}
_LEGACY_CLIP_NAME = re.compile(r"^(?P<head>.+\.self_attn)\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")


@dataclass(frozen=True)
class Misfit:
    """A module whose name matches one of the model's but whose factors describe another shape."""

    module: str  # as the file spells it
    keys: tuple[str, ...]
    file_shape: tuple[int, ...] | None  # the weight shape its factors describe, where they tell one
    model_shape: tuple[int, ...]


def _dims(shape: tuple[int, ...] | None) -> str:
    return "×".join(map(str, shape)) if shape else "(no shape)"


def misfit_example(misfits: list[Misfit], model: str) -> str:
    """The first module whose name matched and shape did not, as `name: file 32×32, sd1 320×320`."""
    first = misfits[0]
    return f"{first.module}: file {_dims(first.file_shape)}, {model} {_dims(first.model_shape)}"


class UnmatchedKeysError(BadFileError):
    """Keys that fit no module of the architecture; `keys` holds all of them for --json. When names matched
    and shapes did not, the line says so: the LoRA was made for another model, which --checkpoint reads."""

    def __init__(self, keys: list[str], base: str, misfits: list[Misfit] | None = None, builtin: bool = True) -> None:
        self.keys = keys
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        unmatched = f"{len(keys)} key(s) fit no module of the {base} model"
        named = sum(len(m.keys) for m in misfits or [])
        if not named:
            message = f"{unmatched}: {shown}"
        else:
            who = f"{len(keys)} key(s)" if named == len(keys) else f"{unmatched} ({shown}); {named} of them"
            hint = "Pass that model with --checkpoint" if builtin else "Is this the model it was made for?"
            message = (f"{who} name modules of the {base} model but not their shapes (e.g. "
                       f"{misfit_example(misfits, base)}): a LoRA for a resized, pruned or other model? {hint}")
        super().__init__(message)

    def json_details(self) -> dict:
        return {"unmatched": self.keys}


@dataclass
class _Group:
    """One module as a file spells it: its keys by part name, and the target it names (if any)."""

    name: str
    target: Target | None
    keys: dict[str, str] = field(default_factory=dict)
    peft_config: dict | None = None  # LoraConfig-style alphas (lora_alpha, alpha_pattern, use_rslora)
    spelled: str = ""  # the module path as the config's patterns see it
    fused: FusedModule | None = None  # the fused projection it names, split into its parts once built


@dataclass
class _Source:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    dialect: str
    peft_folders: dict[str | None, dict] = field(default_factory=dict)  # component (None: root) -> config


def load_lora(
    path: str | os.PathLike, base: str | None = None, architecture: Architecture | None = None
) -> LoraFile:
    """Read `path` (file or PEFT folder) into canonical form against `architecture` or the built-in `base`."""
    source = _read_source(Path(path))
    builtin = architecture is None
    if architecture is None:
        found = _probe_source(source)
        base = base or found.base
        if base not in bases():  # a family that reads no LoRAs refuses in its own words (builtin_architecture)
            raise BadFileError(f"cannot tell the base model from this file (probe says {base}); pass --base")
        variant = found.details.get("variant") if found.base == base else None
        architecture = builtin_architecture(base, variant)
    lora, unmatched, misfits = _resolve(source, architecture)
    if unmatched:
        raise UnmatchedKeysError(unmatched, architecture.base, misfits, builtin)
    if lora is None:
        raise BadFileError("the file holds no LoRA modules")
    return lora


def load_lora_matched(
    path: str | os.PathLike, architecture: Architecture
) -> tuple[LoraFile | None, list[str], list[Misfit]]:
    """`load_lora` that hands back the keys landing nowhere instead of refusing the file (merge
    --allow-unmatched): what did land (None if nothing did), those keys, sorted, and the modules among
    them whose names matched but shapes did not."""
    lora, unmatched, misfits = _resolve(_read_source(Path(path)), architecture)
    if lora is None and not unmatched:
        raise BadFileError("the file holds no LoRA modules")
    return lora, unmatched, misfits


def _resolve(source: _Source, architecture: Architecture) -> tuple[LoraFile | None, list[str], list[Misfit]]:
    """The modules of `source` that land on `architecture` (None if none do), its keys that land nowhere,
    and the modules among those whose name matched a target but whose shape did not."""
    if source.dialect == "cloneofsimo":
        groups = _cloneofsimo_groups(source, architecture)
    elif source.dialect == "peft":
        groups = _peft_groups(source, architecture)
    else:
        groups = _named_groups(source, architecture)
    family = family_of(architecture.base)
    if family is not None and (refusal := family.lora_refusal({g.name: g.keys for g in groups})):
        raise AdapterzooError(refusal)
    modules: dict[str, AdapterModule] = {}
    used: set[str] = set()
    misfits: list[Misfit] = []
    for group in groups:
        module = _build(group, source.tensors) if group.target is not None else None
        if module is None and group.target is not None:
            misfits.append(Misfit(group.name, tuple(group.keys.values()), _file_shape(group, source.tensors),
                                  group.target.shape))
        if module is None:
            continue
        _check_delta_forms(group.name, module)
        pieces = _pieces(module, group, architecture)
        if any(path in modules for path in pieces):
            continue  # a second spelling of a module already read: its keys stay unmatched, never dropped
        modules.update(pieces)
        used.update(group.keys.values())
    embeddings = {k: v for k, v in source.tensors.items() if source.metadata.get(k) == "<embed>"}
    unmatched = sorted(k for k in source.tensors if k not in used and k not in embeddings)
    if not modules:
        return None, unmatched, misfits
    order = {p: i for i, p in enumerate(architecture.targets)}
    modules = dict(sorted(modules.items(), key=lambda item: order[item[0]]))
    return LoraFile(modules, architecture, source.dialect, dict(source.metadata), embeddings), unmatched, misfits


def _pieces(module: AdapterModule, group: _Group, architecture: Architecture) -> dict[str, AdapterModule]:
    """The module on its target, or a fused module split into its parts (exact row blocks of ΔW)."""
    if group.fused is None:
        return {group.target.path: module}
    shapes = {path: architecture.targets[path].shape for path, _ in group.fused.parts}
    if isinstance(module, LoraModule):
        return split_fused(module, group.fused, shapes)
    return split_full(module, group.fused, shapes)


def _target(architecture: Architecture, name: str) -> tuple[Target | None, FusedModule | None]:
    """The target `name` spells, or a stand-in of a fused projection's shape with that projection."""
    target = architecture.resolve(name)
    fused = architecture.fused.get(name) if target is None else None
    if fused is not None:
        component = architecture.targets[fused.parts[0][0]].component
        target = Target(f"{component}.{fused.name}", component, fused.name, None, fused.shape)
    return target, fused


def _file_shape(group: _Group, tensors: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The weight shape a module's factors describe (out, in[, k, k]), to show beside the model's."""
    parts = {name: tensors[key].shape for name, key in group.keys.items()}
    if "down" in parts and "up" in parts and len(parts["down"]) >= 2:
        return parts["up"][0], parts["down"][1], *parts.get("mid", parts["down"])[2:]
    if "hada_w1_a" in parts and "hada_w1_b" in parts and len(parts["hada_w1_b"]) >= 2:
        return parts["hada_w1_a"][0], parts["hada_w1_b"][1]
    w1, w2 = _lokr_factor(parts, "1"), _lokr_factor(parts, "2")
    if w1 and w2:
        return w1[0] * w2[0], w1[1] * w2[1]
    diff = parts.get("diff", parts.get("w_norm"))
    return tuple(diff) if diff is not None else None


def _lokr_factor(parts: dict[str, torch.Size], i: str) -> tuple[int, int] | None:
    """The 2-D shape of LoKr factor w1 or w2, stored full or as a product; None for a Tucker w2."""
    full, a, b = parts.get(f"lokr_w{i}"), parts.get(f"lokr_w{i}_a"), parts.get(f"lokr_w{i}_b")
    if full is not None:
        return (full[0], full[1]) if len(full) >= 2 else None
    if a is None or b is None or len(a) < 1 or len(b) < 2 or "lokr_t2" in parts and i == "2":
        return None
    return a[0], b[1]


# -- reading files ------------------------------------------------------------------------------


def _read_source(path: Path) -> _Source:
    if path.is_dir():
        return _read_peft_folder(path)
    if not path.is_file():
        raise BadFileError(f"{path} is not a file or folder")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state = unwrap_state_dict(load_pickle(path))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BadFileError("pickle does not hold a flat dict of tensors")
        tensors, metadata = {str(k): v for k, v in state.items()}, {}
    else:
        metadata = read_header(path).metadata  # validates the header before any tensor is read
        with safetensors_errors(path):
            tensors = load_file(str(path))
    dialect = detect_lora_dialect(list(tensors))
    if dialect is None:
        raise BadFileError("no LoRA-family keys in this file")
    return _Source(tensors, metadata, dialect)


def _read_peft_folder(folder: Path) -> _Source:
    """A PEFT adapter folder, or a folder with one per component (unet/, text_encoder/, ...)."""
    if (folder / PEFT_CONFIG).is_file():
        adapters = {None: folder}
    else:
        adapters = {p.name: p for p in sorted(folder.iterdir()) if (p / PEFT_CONFIG).is_file()}
    if not adapters:
        raise BadFileError(f"{folder} has no {PEFT_CONFIG}, neither at the top nor in component subfolders")
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    configs: dict[str | None, dict] = {}
    for component, adapter in adapters.items():
        config = read_json_object(adapter / PEFT_CONFIG)
        if config.get("peft_type", "LORA") != "LORA":
            raise BadFileError(f"{adapter.name}: PEFT type {config.get('peft_type')} is not LoRA")
        weights = adapter / PEFT_WEIGHTS
        if not weights.is_file():
            raise BadFileError(f"{adapter} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")
        metadata.update(read_header(weights).metadata)
        prefix = "" if component is None else f"{component}/"
        with safetensors_errors(weights):
            tensors.update({prefix + k: v for k, v in load_file(str(weights)).items()})
        configs[component] = config
    return _Source(tensors, metadata, "peft", configs)


def _probe_source(source: _Source) -> ProbeResult:
    """probe's shape rules (FORMATS.md §1.7) on the same keys; PEFT subfolder keys get their component. The
    variant of a family whose members differ in size comes with the base."""
    tensors = {k.replace("/", "."): v for k, v in source.tensors.items()}
    result = ProbeResult(path="")

    def scalar(key: str) -> float:
        return one_number(key, tensors[key])

    root_config = source.peft_folders.get(None)
    probe_lora(table_from_state_dict(tensors), source.metadata, scalar, result, root_config)
    return result


# -- grouping keys per dialect --------------------------------------------------------------------


def _named_groups(source: _Source, architecture: Architecture) -> list[_Group]:
    """kohya, kohya-ldm, lycoris, diffusers and diffusers-legacy: the module name is in the key."""
    groups: dict[str, _Group] = {}
    configs = _diffusers_configs(source.metadata) if source.dialect == "diffusers" else {}
    for key in source.tensors:
        split = split_key(key, source.dialect)
        if split is None:
            continue
        name, part = split
        if name not in groups:
            lookup = name
            if source.dialect == "diffusers-legacy" and (m := _LEGACY_CLIP_NAME.match(name)):
                lookup = f"{m['head']}.{_LEGACY_CLIP[m['proj']]}"
            target, fused = _target(architecture, lookup)
            groups[name] = _Group(name, target, fused=fused)
            if target is not None and target.component in configs:
                groups[name].peft_config = configs[target.component]
                groups[name].spelled = name.removeprefix(target.component + ".")
        groups[name].keys[_PART_NAMES.get(part, part)] = key
    return list(groups.values())


def _diffusers_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata`: LoraConfig kwargs flattened as `<component>.<field>`."""
    raw = metadata.get(DIFFUSERS_ADAPTER_METADATA)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise BadFileError(f"metadata {DIFFUSERS_ADAPTER_METADATA} is not JSON") from None
    if not isinstance(flat, dict):
        raise BadFileError(f"metadata {DIFFUSERS_ADAPTER_METADATA} is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _peft_groups(source: _Source, architecture: Architecture) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for key in source.tensors:
        folder, _, inner = key.rpartition("/")
        split = split_key(inner, "peft")
        if split is None or not split[0].startswith(PEFT_PREFIX):
            continue
        name, part = split
        groups.setdefault(f"{folder}/{name}", _Group(name, None)).keys[_PART_NAMES.get(part, part)] = key
    by_folder: dict[str, list[_Group]] = {}
    for full, group in groups.items():
        by_folder.setdefault(full.rpartition("/")[0], []).append(group)
    for folder, members in by_folder.items():
        config = source.peft_folders.get(folder or None)
        components = [folder] if folder else _components(architecture)
        component = max(components, key=lambda c: _fitting(members, c, source.tensors, architecture))
        for group in members:
            group.spelled = group.name.removeprefix(PEFT_PREFIX)
            group.target, group.fused = _target(architecture, group.name)  # a family may spell PEFT names itself
            if group.target is None:
                group.target, group.fused = _target(architecture, f"{component}.{group.spelled}")
            group.peft_config = config
    return list(groups.values())


def _components(architecture: Architecture) -> list[str]:
    return list(dict.fromkeys(t.component for t in architecture.targets.values()))


def _fitting(groups: list[_Group], component: str, tensors: dict[str, torch.Tensor], arch: Architecture) -> int:
    """How many of a root PEFT folder's modules fit `component` (SDXL's two CLIPs share names)."""
    count = 0
    for group in groups:
        target = arch.resolve(f"{component}.{group.name.removeprefix(PEFT_PREFIX)}")
        if target is not None and "down" in group.keys and "up" in group.keys:
            down, up = tensors[group.keys["down"]], tensors[group.keys["up"]]
            count += (up.shape[0], down.shape[1]) == target.shape[:2]
    return count


def _cloneofsimo_groups(source: _Source, architecture: Architecture) -> list[_Group]:
    groups: list[_Group] = []
    for component in ("unet", "text_encoder"):
        names = {split[0] for key in source.tensors if (split := split_key(key, "cloneofsimo"))}
        indices = sorted({int(name.split(":")[1]) for name in names if name.startswith(component + ":")})
        if not indices:
            continue
        order = injection_order(architecture, component, injected_classes(source.metadata, component))
        if indices != list(range(len(order))):
            raise BadFileError(
                f"cloneofsimo {component} pairs are numbered 0..{indices[-1]}, but the {architecture.base} "
                f"{component} has {len(order)} injected layers"
            )
        for i, target in enumerate(order):
            keys = {p: f"{component}:{i}:{p}" for p in ("down", "up") if f"{component}:{i}:{p}" in source.tensors}
            groups.append(_Group(f"{component}:{i}", target, keys))
    return groups


# -- building canonical modules ---------------------------------------------------------------------


def _peft_alpha(group: _Group, rank: int) -> float:
    """LoraConfig semantics: alpha_pattern regexes, then lora_alpha; rsLoRA stored as alpha·√r."""
    config = group.peft_config or {}
    alpha = _config_alpha(config.get("lora_alpha", PEFT_DEFAULT_ALPHA), "lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise BadFileError(f"alpha_pattern in the adapter config is a {type(patterns).__name__}, not an object")
    for pattern, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({pattern})$", group.spelled)
        except re.error:
            raise BadFileError(f"alpha_pattern {pattern!r} in the adapter config is not a regular expression") from None
        if hit:
            alpha = _config_alpha(value, f"alpha_pattern {pattern!r}")
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _config_alpha(value: object, name: str) -> float:
    if (alpha := config_number(value)) is None:
        raise BadFileError(f"{name} in the adapter config is {value!r}, not a number")
    return alpha


def _alpha(group: _Group, tensors: dict[str, torch.Tensor], rank: int) -> float:
    if "alpha" in group.keys:
        return one_number(group.keys["alpha"], tensors[group.keys["alpha"]])
    if "scale" in group.keys:  # A1111's per-module override of alpha / r
        return one_number(group.keys["scale"], tensors[group.keys["scale"]]) * rank
    if group.peft_config is not None:
        return _peft_alpha(group, rank)
    return float(rank)  # no alpha anywhere: every loader uses scale 1


def _dora_scale(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor | None:
    """LyCORIS dora_scale as read, or PEFT's magnitude [out] / [1, out, 1, 1], shaped like the target."""
    tail = [1] * (len(shape) - 1)
    if "magnitude" in parts:
        magnitude = parts["magnitude"]
        return magnitude.reshape(shape[0], *tail) if magnitude.numel() == shape[0] else None
    scale = parts.get("dora_scale")
    if scale is None:
        return None
    if scale.dim() >= 2 and dora_on_output(scale) and scale.numel() == shape[0]:
        return scale.reshape(shape[0], *tail)
    if scale.dim() >= 2 and scale.shape[0] == 1 and scale.numel() == shape[1]:
        return scale.reshape(1, shape[1], *tail[1:])
    return None


def _lora(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
    """(down, up, mid) reshaped to the target's dimensionality, or None if they don't fit it."""
    down, up, mid = parts["down"], parts["up"], parts.get("mid")
    rank = down.shape[0]
    kernel = tuple((mid if mid is not None else down).shape[2:]) or (1, 1)
    ones = (1,) * (len(shape) - 2)  # a conv's 1x1 (Conv2d) or 1x1x1 (Conv3d: a video DiT's patch embedding) up
    if len(shape) not in (2, 4, 5) or down.dim() < 2 or up.dim() < 2:
        return None
    if tuple(up.shape[:2]) != (shape[0], rank) or tuple(up.shape[2:]) not in ((), (1, 1), ones) \
            or down.shape[1] != shape[1]:
        return None
    if len(shape) == 2:
        fits = kernel == (1, 1) and mid is None
        return (down.reshape(rank, shape[1]), up.reshape(shape[0], rank), None) if fits else None
    if kernel != shape[2:] or (mid is not None and len(shape) != 4):
        return None
    if mid is not None:
        return down.reshape(rank, shape[1], 1, 1), up.reshape(shape[0], rank, 1, 1), mid
    return down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, *ones), None


def _fits_loha(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> bool:
    if "hada_t1" in parts:
        t1 = parts["hada_t1"]
        return parts["hada_w1_a"].shape[1] == shape[0] and (parts["hada_w1_b"].shape[1], *t1.shape[2:]) == shape[1:]
    return parts["hada_w1_a"].shape[0] == shape[0] and parts["hada_w1_b"].shape[1] == math.prod(shape[1:])


def _fits_lokr(parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> bool:
    w1 = parts.get("lokr_w1")
    a, c = w1.shape[:2] if w1 is not None else (parts["lokr_w1_a"].shape[0], parts["lokr_w1_b"].shape[1])
    if "lokr_w2" in parts:
        b, inner = parts["lokr_w2"].shape[0], math.prod(parts["lokr_w2"].shape[1:])
    elif "lokr_t2" in parts:
        b = parts["lokr_w2_a"].shape[1]
        inner = parts["lokr_w2_b"].shape[1] * math.prod(parts["lokr_t2"].shape[2:])
    else:
        b, inner = parts["lokr_w2_a"].shape[0], parts["lokr_w2_b"].shape[1]
    return a * b == shape[0] and c * inner == math.prod(shape[1:])


def _check_delta_forms(name: str, module: AdapterModule) -> None:
    """Factors that fit the target on the outside but not each other inside are a broken file, said here in
    one line instead of as a torch error later (from shapes alone: `delta_shapes`)."""
    try:
        check_delta_shape(module)
    except ZeroDivisionError:
        raise BadFileError(f"module {name} has rank 0") from None
    except ShapeMismatch as exc:
        raise BadFileError(f"module {name}: its factors do not form a {list(module.shape)} change ({exc})") from None


def _build(group: _Group, tensors: dict[str, torch.Tensor]) -> AdapterModule | None:
    """The canonical module for a group, or None if its parts don't fit its target."""
    parts = {name: tensors[key] for name, key in group.keys.items()}
    shape = group.target.shape
    flat = sorted(p for p in parts.keys() & _FACTOR_PARTS if parts[p].dim() < 2)
    if flat:
        raise BadFileError(f"module {group.name}: {flat[0]} has shape {list(parts[flat[0]].shape)}, "
                           "but a factor is a matrix")
    known = {"down", "up", "mid", "alpha", "scale", "dora_scale", "magnitude"}
    if "down" in parts and "up" in parts and set(parts) <= known:
        factors = _lora(parts, shape)
        dora = _dora_scale(parts, shape)
        if factors is None or (dora is None and ("dora_scale" in parts or "magnitude" in parts)):
            return None
        down, up, mid = factors
        return LoraModule(down, up, _alpha(group, tensors, down.shape[0]), shape, mid, dora)
    dora = _dora_scale(parts, shape)
    if "dora_scale" in parts and dora is None:
        return None
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= set(parts):
        if not _fits_loha(parts, shape):
            return None
        rank = parts["hada_w1_b"].shape[0]
        return LohaModule(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"],
                          _alpha(group, tensors, rank), shape, parts.get("hada_t1"), parts.get("hada_t2"), dora)
    if ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts)) and (
            "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts)):
        if not _fits_lokr(parts, shape):
            return None
        inner = parts.get("lokr_w1_b", parts.get("lokr_w2_b"))
        alpha = _alpha(group, tensors, inner.shape[0] if inner is not None else 1)  # unused if both are full
        return LokrModule(alpha, shape, parts.get("lokr_w1"), parts.get("lokr_w1_a"), parts.get("lokr_w1_b"),
                          parts.get("lokr_w2"), parts.get("lokr_w2_a"), parts.get("lokr_w2_b"), parts.get("lokr_t2"),
                          dora)
    if "on_input" in parts and "weight" in parts:
        on_input = bool(one_number(group.keys["on_input"], parts["on_input"]))
        weight = parts["weight"].flatten()
        return Ia3Module(weight, on_input, shape) if weight.numel() == shape[1 if on_input else 0] else None
    diff = parts.get("diff", parts.get("w_norm"))
    if diff is not None:
        diff_b = parts.get("diff_b", parts.get("b_norm"))
        if diff.dim() == 0 or diff.numel() != math.prod(shape) or diff.shape[0] != shape[0]:
            return None
        return FullModule(diff, shape, diff_b)
    raise BadFileError(
        f"module {group.name} has parts {', '.join(sorted(group.keys))}: not a LoRA, LoHa, LoKr, IA3 or full "
        "module (OFT, GLoRA and bias deltas are not read)"
    )
