"""Read a Flux LoRA of any dialect (kohya, diffusers, PEFT, BFL/ComfyUI, XLabs, OneTrainer) into the
canonical form: diffusers `FluxTransformer2DModel` paths, plus CLIP-L and T5 text-encoder paths.

A module named in BFL space is either one target under another name (an alias) or a fused projection:
it is built against the fused weight's shape and split exactly into its parts (FLUX.md §2; LyCORIS
modules there become full row blocks). Scales
follow each dialect's rule (alpha tensors, diffusers/PEFT configs, none for XLabs: s = 1). BFL Control
LoRAs are refused: they change shapes and replace norm scales, so they are not additive LoRAs.
"""

from __future__ import annotations

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.flux_fused import split_fused, split_full
from adapterzoo.formats.lora.flux_lora_keys import is_control_lora
from adapterzoo.formats.lora.lora_keys import split_key
from adapterzoo.formats.lora.lora_model import AdapterModule, LoraFile, LoraModule
from adapterzoo.formats.lora.lora_read import _PART_NAMES, PEFT_PREFIX, _build, _diffusers_configs, _Group, _Source
from adapterzoo.formats.model.architectures import Target
from adapterzoo.formats.model.flux_modules import TRANSFORMER, BflModule, FluxArchitecture


def _groups(source: _Source, architecture: FluxArchitecture) -> list[tuple[_Group, BflModule | None]]:
    """Keys grouped per module as spelled (per PEFT component folder), each with the fused module it is on."""
    configs = _diffusers_configs(source.metadata) if source.dialect == "diffusers" else {}
    groups: dict[str, tuple[_Group, BflModule | None]] = {}
    for key in source.tensors:
        folder, _, inner = key.rpartition("/")  # a PEFT folder per component: "<component>/<key>"
        split = split_key(inner, source.dialect)
        if split is None:
            continue
        name, part = split
        if f"{folder}/{name}" not in groups:
            groups[f"{folder}/{name}"] = _group(name, folder, source, architecture, configs)
        groups[f"{folder}/{name}"][0].keys[_PART_NAMES.get(part, part)] = key
    return list(groups.values())


def _group(
    name: str, folder: str, source: _Source, arch: FluxArchitecture, configs: dict[str, dict]
) -> tuple[_Group, BflModule | None]:
    lookup = name
    if folder and name.startswith(PEFT_PREFIX):
        lookup = f"{folder}.{name.removeprefix(PEFT_PREFIX)}"
    target = arch.resolve(lookup)
    group = _Group(name, target)
    fused = arch.fused.get(lookup) if target is None else None
    if fused is not None:
        group.target = Target(f"{TRANSFORMER}.{fused.name}", TRANSFORMER, fused.name, None, fused.shape)
    component = group.target.component if group.target is not None else None
    if source.dialect == "peft":
        group.peft_config = source.peft_folders.get(folder or None)
        group.spelled = name.removeprefix(PEFT_PREFIX)
    elif component in configs:
        group.peft_config = configs[component]
        group.spelled = name.removeprefix(component + ".")
    return group, fused


def resolve_flux(source: _Source, architecture: FluxArchitecture) -> tuple[LoraFile | None, list[str]]:
    """The modules of `source` on Flux targets (None if none land) and the keys that land nowhere."""
    groups = _groups(source, architecture)
    if is_control_lora({g.name: g.keys for g, _ in groups}):
        raise AdapterzooError("this is a BFL Control LoRA (bias deltas, replacement norm scales, a wider img_in): "
                              "it is not an additive LoRA, and converting or merging it is not supported yet")
    shapes = {path: target.shape for path, target in architecture.targets.items()}
    modules: dict[str, AdapterModule] = {}
    used: set[str] = set()
    for group, fused in groups:
        module = _build(group, source.tensors) if group.target is not None else None
        if module is None:
            continue
        if fused is None:
            pieces = {group.target.path: module}
        elif isinstance(module, LoraModule):
            pieces = split_fused(module, fused, shapes)
        else:
            pieces = split_full(module, fused, shapes)
        if any(path in modules for path in pieces):
            continue  # a second spelling of a module already read: its keys stay unmatched, never dropped
        modules.update(pieces)
        used.update(group.keys.values())
    unmatched = sorted(k for k in source.tensors if k not in used)
    if not modules:
        return None, unmatched
    order = {path: i for i, path in enumerate(architecture.targets)}
    modules = dict(sorted(modules.items(), key=lambda item: order[item[0]]))
    return LoraFile(modules, architecture, source.dialect, dict(source.metadata)), unmatched
