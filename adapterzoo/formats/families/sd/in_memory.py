"""Single-file LDM/SGM checkpoint -> a diffusers pipeline in memory, never a folder on disk.

The converter's plan (configs from shapes, names, checks) builds each component with its parameters on the
`meta` device; each component's tensors are then read from the file and assigned in place, one component at
a time, so the peak is the model in its target dtype plus nothing but the buffers.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import diffusers
import torch
from transformers import CLIPTokenizer

from adapterzoo.formats.checkpoint.clip_tokenizer import MAX_LENGTH, special_tokens, vocabulary
from adapterzoo.formats.families.sd.to_diffusers import DATA, Component, plan_diffusers
from adapterzoo.formats.io.safetensors_writer import planned_tensor
from adapterzoo.formats.io.tensor_source import TensorSource
from adapterzoo.formats.model.on_meta import parameters_on_meta


def _empty(model: torch.nn.Module) -> torch.nn.Module:
    """A twin of the planned (all-meta) model, parameters on meta, buffers real."""
    with parameters_on_meta():
        if hasattr(model, "save_config"):
            return type(model).from_config(model.config)
        return type(model)(model.config)


def _loaded(component: Component, dtype: torch.dtype) -> torch.nn.Module:
    model = _empty(component.model)
    state = {t.name: planned_tensor(t) for t in component.tensors}
    model.load_state_dict(state, strict=True, assign=True)
    return torch.nn.Module.to(model, dtype)  # the floating buffers; diffusers' own `to` warns on every call


def _tokenizer(text_encoder: torch.nn.Module, vocab: dict[str, int], merges: list[tuple[str, ...]]) -> CLIPTokenizer:
    openclip = text_encoder.config.hidden_act == "gelu"
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH,
                         **special_tokens("!" if openclip else "<|endoftext|>"))


def _scheduler(base: str, prediction: str) -> Any:
    config = json.loads((DATA / f"scheduler_{base}.json").read_text(encoding="utf-8"))
    config["prediction_type"] = prediction
    return getattr(diffusers, config["_class_name"]).from_config(config)


def pipeline_in_memory(source: TensorSource, dtype: torch.dtype) -> tuple[str, Any]:
    """The base and the diffusers pipeline of a single file, every tensor cast to `dtype`."""
    plan = plan_diffusers(source, dtype)
    parts: dict[str, Any] = {"scheduler": _scheduler(plan.base, plan.prediction_type)}
    vocab, lines, _ = vocabulary()
    merges = [tuple(line.split()) for line in lines]
    for component in plan.components:
        parts[component.name] = _loaded(component, dtype)
        if component.name.startswith("text_encoder"):
            parts[component.name.replace("text_encoder", "tokenizer")] = _tokenizer(parts[component.name], vocab, merges)
    pipeline_class = getattr(diffusers, plan.pipeline)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    parts.update({name: None for name in ("safety_checker", "feature_extractor", "image_encoder") if name in accepted})
    if "requires_safety_checker" in accepted:
        parts["requires_safety_checker"] = False
    return plan.base, pipeline_class(**{k: v for k, v in parts.items() if k in accepted})
