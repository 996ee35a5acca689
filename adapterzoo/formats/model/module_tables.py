"""Which modules of a model (a UNet, a DiT transformer, a CLIP or T5 text encoder) hold a weight, with its shape,
from the model's class and config.

Building the model on the `meta` device answers it exactly, but importing diffusers and transformers
costs a command about 5 s, more than merging a LoRA into an SD1.5 UNet takes. So the tables of the
configs that the families' built-in bases and standard single files give ship with the package
(`data/module_tables.json.gz`, written by `tools/write_module_tables.py`); any other config is built.
A test proves that every shipped table equals what diffusers and transformers build now.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

UNET_CLASS = "UNet2DConditionModel"
CLIP_CLASS = "CLIPTextModel"
CLIP_PROJECTION_CLASS = "CLIPTextModelWithProjection"
T5_CLASS = "T5EncoderModel"
SHIPPED = "module_tables.json.gz"
SAVE_ONLY = ("architectures", "transformers_version", "torch_dtype", "dtype")  # config fields that describe a save

Modules = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class ModuleTable:
    """(module path, weight shape) of every module holding a weight, in the model's order."""

    modules: Modules
    config: dict[str, Any]  # a UNet's full config, defaults included (its LDM layout is read from it); else {}


def module_table(model_class: str, config: dict[str, Any]) -> ModuleTable:
    """The table of `model_class` (a diffusers model or a transformers text encoder) built from `config`."""
    shipped = shipped_table(table_key(model_class, config))
    return shipped if shipped is not None else table_of(build_on_meta(model_class, config))


def saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config without the fields that only describe the save (`_name_or_path`, versions)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in SAVE_ONLY}


def table_key(model_class: str, config: dict[str, Any]) -> str:
    """What a table is shipped under: the class and config, without the `_`-keys that builders ignore."""
    kept = {k: v for k, v in config.items() if not k.startswith("_")}
    return json.dumps([model_class, kept], sort_keys=True)


def table_of(model: torch.nn.Module) -> ModuleTable:
    modules = tuple((path, tuple(module._parameters["weight"].shape)) for path, module in model.named_modules()
                    if module._parameters.get("weight") is not None)
    is_unet = type(model).__name__ == UNET_CLASS
    config = {k: v for k, v in model.config.items() if not k.startswith("_")} if is_unet else {}
    return ModuleTable(modules, config)


def build_on_meta(model_class: str, config: dict[str, Any]) -> torch.nn.Module:
    """The model without weights (diffusers' class of that name, else transformers'): only its modules' names and
    shapes are wanted."""
    import diffusers
    import torch

    with torch.device("meta"):
        if hasattr(diffusers, model_class):
            return getattr(diffusers, model_class).from_config(config)
        import transformers

        model = getattr(transformers, model_class)
        return model(model.config_class.from_dict(config))


@functools.cache
def shipped_table(key: str) -> ModuleTable | None:
    """The shipped table under `key`, if any; only the tables asked for are parsed."""
    raw = _shipped_json().get(key)
    if raw is None:
        return None
    entry = json.loads(raw)
    return ModuleTable(tuple((path, tuple(shape)) for path, shape in entry["modules"]), entry["config"])


def shipped_keys() -> list[str]:
    return sorted(_shipped_json())


@functools.cache
def _shipped_json() -> dict[str, str]:
    """table key -> that table as JSON text ({"modules": [[path, shape], ...], "config": {...}})."""
    return json.loads(gzip.decompress((resources.files("adapterzoo") / "data" / SHIPPED).read_bytes()))
