"""Single-file LDM/SGM checkpoint -> diffusers folder, with every config inferred from the tensors, offline.

Each component is planned name by name, then checked against the diffusers/transformers model its
inferred config builds (on the `meta` device, no memory): a missing, surplus or mis-shaped tensor
stops the conversion before anything is written. Weights are then streamed tensor by tensor.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.clip_tokenizer import write_clip_tokenizer
from adapterzoo.formats.checkpoint.shape_reading import clip_config_from_hf, vae_config_from_ldm
from adapterzoo.formats.families.sd.config_from_shapes import (
    VAE_SAMPLE_SIZE,
    VAE_SCALING,
    unet_config_from_ldm,
    unet_layout_from_ldm,
)
from adapterzoo.formats.families.sd.probe import LDM_TEXT_ENCODERS
from adapterzoo.formats.io.safetensors_writer import (
    PlannedTensor,
    plan_dtype,
    write_safetensors,
)
from adapterzoo.formats.io.tensor_source import TensorSource
from adapterzoo.formats.model import unet_names, vae_names
from adapterzoo.formats.model.clip_names import (
    TRANSPOSED,
    is_openclip_root,
    openclip_to_hf,
    split_in_proj,
    strip_text_model,
)

DATA = Path(__file__).resolve().parents[3] / "data"  # adapterzoo/data
CLIP_VOCAB = 49408
OPENCLIP_H_LAYERS = 24  # SD2 reads the penultimate of OpenCLIP-H's 24 layers; diffusers keeps 23
PIPELINES = {
    ("sd1", 4): "StableDiffusionPipeline",
    ("sd1", 8): "StableDiffusionInstructPix2PixPipeline",
    ("sd1", 9): "StableDiffusionInpaintPipeline",
    ("sdxl", 4): "StableDiffusionXLPipeline",
    ("sdxl", 8): "StableDiffusionXLInstructPix2PixPipeline",
    ("sdxl", 9): "StableDiffusionXLInpaintPipeline",
}
Plan = dict[str, PlannedTensor]


@dataclasses.dataclass
class Component:
    """A diffusers component about to be written: its model (on meta, for the config and key set) and tensors."""

    name: str
    model: torch.nn.Module
    plan: Plan
    origins: dict[str, str]  # plan name -> the source key it is cut from
    weights: str  # file name inside the component folder
    strict: bool  # False: tensors the model has no place for are dropped (text-encoder extras)
    tensors: list[PlannedTensor] = dataclasses.field(default_factory=list)  # set by fitting, in the model's order
    used: set[str] = dataclasses.field(default_factory=set)  # source keys the written tensors come from


@dataclasses.dataclass
class DiffusersPlan:
    """Everything about the folder to write, checked before a byte is written."""

    base: str
    pipeline: str
    prediction_type: str
    components: list[Component]
    dropped: int  # source tensors with no place in the pipeline (EMA, schedule buffers, logit_scale, ...)
    warnings: list[str]


def ldm_base(source: TensorSource) -> str:
    """sd1 / sd2 / sdxl from where the text encoders live; other layouts are refused with the reason."""
    keys = source.shapes
    if not any(k.startswith(unet_names.LDM_PREFIX + "input_blocks.") for k in keys):
        raise BadFileError("no SD UNet (model.diffusion_model.input_blocks.*): only SD1/SD2/SDXL convert to diffusers")
    if not any(k.startswith(vae_names.LDM_PREFIX) for k in keys):
        raise BadFileError("no VAE (first_stage_model.*) in the checkpoint; a diffusers pipeline needs one")
    for base in ("sdxl", "sd2", "sd1"):
        if all(any(k.startswith(p) for k in keys) for p in LDM_TEXT_ENCODERS[base].values()):
            return base
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise BadFileError("SGM checkpoints with one OpenCLIP text encoder (SDXL refiner) are not supported")
    raise BadFileError("no text encoder (cond_stage_model.* or conditioner.embedders.*) in the checkpoint")


def prediction_type(source: TensorSource, base: str) -> tuple[str, list[str]]:
    """What the UNet predicts: marker keys or ModelSpec metadata when present, else the base's usual kind."""
    if "v_pred" in source.shapes:
        return "v_prediction", []
    spec = source.metadata.get("modelspec.prediction_type")
    if spec in ("v", "v_prediction", "epsilon"):
        return ("epsilon" if spec == "epsilon" else "v_prediction"), []
    if base != "sd2":
        return "epsilon", []
    if source.extras.get("global_step") == 875000:  # SD2-base, the one epsilon SD2 (diffusers decides the same way)
        return "epsilon", []
    return "v_prediction", [
        "the weights do not say what the UNet predicts; assumed v_prediction (SD2 768-v): "
        "edit scheduler/scheduler_config.json for an epsilon model"
    ]


def _under(source: TensorSource, prefix: str) -> dict[str, str]:
    """{name without prefix: full key} for every tensor under `prefix`."""
    return {k[len(prefix):]: k for k in source.shapes if k.startswith(prefix)}


def _text_encoder_plan(source: TensorSource, prefix: str, dtype: torch.dtype | None) -> tuple[Plan, dict[str, str]]:
    plan: Plan = {}
    origins: dict[str, str] = {}
    for rest, key in _under(source, prefix).items():
        if not is_openclip_root(prefix):
            name = strip_text_model(rest)
            plan[name], origins[name] = source.planned(key, name, dtype), key
            continue
        names = openclip_to_hf(rest)
        if names is None:
            continue  # logit_scale and other OpenCLIP-only tensors have no HF twin
        origins.update(dict.fromkeys(names, key))
        if len(names) == 3:
            rows = source.shapes[key][0] // 3
            for slot, name in enumerate(names):
                plan[name] = source.planned(
                    key, name, dtype, (rows, *source.shapes[key][1:]), lambda t, s=slot: split_in_proj(t)[s]
                )
        elif rest == TRANSPOSED:
            shape = tuple(reversed(source.shapes[key]))
            plan[names[0]] = source.planned(key, names[0], dtype, shape, lambda t: t.t())
        else:
            plan[names[0]] = source.planned(key, names[0], dtype)
    return plan, origins


def _text_encoder(source: TensorSource, component: str, prefix: str, base: str, dtype: torch.dtype | None) -> Component:
    plan, origins = _text_encoder_plan(source, prefix, dtype)
    layers = {int(k.split(".")[2]) for k in plan if k.startswith("encoder.layers.")}
    if base == "sd2":
        plan.pop("text_projection.weight", None)  # SD2's pipeline uses the hidden states, not the projection
        if len(layers) == OPENCLIP_H_LAYERS:
            plan = {k: v for k, v in plan.items() if not k.startswith(f"encoder.layers.{OPENCLIP_H_LAYERS - 1}.")}
    config = CLIPTextConfig(**clip_config_from_hf({k: p.shape for k, p in plan.items()}, is_openclip_root(prefix)))
    model_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
    config.architectures = [model_class.__name__]
    with torch.device("meta"):
        model = model_class(config)
    return Component(component, model, plan, origins, "model.safetensors", strict=False)


def _unet(source: TensorSource, base: str, pooled: int | None, prediction: str, dtype: torch.dtype | None) -> Component:
    keys = _under(source, unet_names.LDM_PREFIX)
    shapes = {rest: source.shapes[key] for rest, key in keys.items()}
    layout = unet_layout_from_ldm(shapes)
    config = unet_config_from_ldm(shapes, base, pooled, prediction)
    plan: Plan = {}
    origins: dict[str, str] = {}
    for rest, key in keys.items():
        name = unet_names.ldm_to_diffusers_module(rest, layout)
        if name is None:
            raise BadFileError(f"UNet tensor {key} has no place in a diffusers UNet")
        plan[name], origins[name] = source.planned(key, name, dtype), key
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel.from_config(config)
    return Component("unet", model, plan, origins, "diffusion_pytorch_model.safetensors", strict=True)


def _vae(source: TensorSource, base: str, dtype: torch.dtype | None) -> Component:
    keys = _under(source, vae_names.LDM_PREFIX)
    shapes = {rest: source.shapes[key] for rest, key in keys.items()}
    config = vae_config_from_ldm(shapes, VAE_SAMPLE_SIZE[base], VAE_SCALING[base])
    levels = len(config["down_block_types"])
    plan: Plan = {}
    origins: dict[str, str] = {}
    for rest, key in keys.items():
        name = vae_names.ldm_to_diffusers_vae(rest, levels)
        if name is None:
            raise BadFileError(f"VAE tensor {key} has no place in a diffusers AutoencoderKL")
        origins[name] = key
        shape = source.shapes[key]
        if vae_names.is_attention_weight(rest) and len(shape) == 4:
            plan[name] = source.planned(key, name, dtype, shape[:2], lambda t: t.reshape(t.shape[:2]))
        else:
            plan[name] = source.planned(key, name, dtype)
    with torch.device("meta"):
        model = diffusers.AutoencoderKL.from_config(config)
    return Component("vae", model, plan, origins, "diffusion_pytorch_model.safetensors", strict=True)


def _fit(component: Component) -> None:
    """Rename the plan to the model's own keys and check every shape; fills `tensors` and `used`."""
    expected = {k: tuple(v.shape) for k, v in component.model.state_dict().items()}
    by_canonical = {strip_text_model(k): k for k in expected}
    plan = {}
    for key, planned in component.plan.items():
        name = by_canonical.get(key, key)
        plan[name] = dataclasses.replace(planned, name=name)
    missing = [k for k in expected if k not in plan]
    surplus = [k for k in plan if k not in expected]
    wrong = [f"{k} {list(p.shape)}, model {list(expected[k])}"
             for k, p in plan.items() if k in expected and p.shape != expected[k]]
    if missing or wrong or (surplus and component.strict):
        problems = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                    f"{len(wrong)} mis-shaped (e.g. {wrong[0]})" if wrong else "",
                    f"{len(surplus)} unexpected (e.g. {surplus[0]})" if surplus and component.strict else ""]
        raise BadFileError(
            f"the {component.name} config inferred from the weights does not fit them: "
            + ", ".join(p for p in problems if p)
        )
    component.used = {component.origins[k] for k in component.plan if by_canonical.get(k, k) in expected}
    component.tensors = [plan[k] for k in expected]


def _save_config(component: Component, folder: Path) -> None:
    if hasattr(component.model, "save_config"):
        component.model.save_config(folder)
        return
    floating = Counter(t.dtype for t in component.tensors if t.dtype.is_floating_point)
    component.model.config.dtype = floating.most_common(1)[0][0] if floating else torch.float32
    component.model.config.save_pretrained(folder)


def _write_scheduler(folder: Path, base: str, prediction: str) -> None:
    config = json.loads((DATA / f"scheduler_{base}.json").read_text(encoding="utf-8"))
    config["prediction_type"] = prediction
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.save_config(folder / "scheduler")


def _model_index(plan: DiffusersPlan) -> dict:
    index: dict = {"_class_name": plan.pipeline, "_diffusers_version": diffusers.__version__}
    for component in plan.components:
        library = "diffusers" if hasattr(component.model, "save_config") else "transformers"
        index[component.name] = [library, type(component.model).__name__]
        if component.name.startswith("text_encoder"):
            index[component.name.replace("text_encoder", "tokenizer")] = ["transformers", "CLIPTokenizer"]
    scheduler = json.loads((DATA / f"scheduler_{plan.base}.json").read_text(encoding="utf-8"))["_class_name"]
    index["scheduler"] = ["diffusers", scheduler]
    index["feature_extractor"] = index["image_encoder"] = [None, None]
    if plan.base == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index["safety_checker"] = [None, None]
        index["requires_safety_checker"] = False
    return index


def plan_diffusers(source: TensorSource, dtype: torch.dtype | None) -> DiffusersPlan:
    """Infer every config from the shapes and check each component against the model it builds (no data read)."""
    base = ldm_base(source)
    prediction, warnings = prediction_type(source, base)
    texts = [_text_encoder(source, name, prefix, base, dtype) for name, prefix in LDM_TEXT_ENCODERS[base].items()]
    pooled = texts[-1].model.config.projection_dim if base == "sdxl" else None
    unet = _unet(source, base, pooled, prediction, dtype)
    components = [unet, _vae(source, base, dtype), *texts]
    for component in components:
        _fit(component)
    in_channels = unet.model.config.in_channels
    pipeline = PIPELINES.get(("sd1" if base == "sd2" else base, in_channels))
    if pipeline is None:
        raise BadFileError(f"a UNet with {in_channels} input channels matches no diffusers pipeline")
    for text in texts:
        if text.model.config.vocab_size != CLIP_VOCAB:
            warnings.append(
                f"{text.name} has {text.model.config.vocab_size} token rows but the CLIP tokenizer has {CLIP_VOCAB}"
            )
    used = set().union(*(c.used for c in components))
    return DiffusersPlan(base, pipeline, prediction, components, len(source.shapes) - len(used), warnings)


def write_diffusers(plan: DiffusersPlan, folder: Path) -> dict:
    """Write the planned pipeline into `folder` (existing and empty), streaming each weight file; returns a report."""
    written = 0
    origin = ""
    for component in plan.components:
        part = folder / component.name
        part.mkdir()
        _save_config(component, part)
        written += write_safetensors(part / component.weights, component.tensors, {"format": "pt"})
        if component.name.startswith("text_encoder"):
            openclip = component.model.config.hidden_act == "gelu"
            tokenizer = folder / component.name.replace("text_encoder", "tokenizer")
            origin = write_clip_tokenizer(tokenizer, "!" if openclip else "<|endoftext|>")
    _write_scheduler(folder, plan.base, plan.prediction_type)
    (folder / "model_index.json").write_text(json.dumps(_model_index(plan), indent=2) + "\n", encoding="utf-8")
    return {
        "base": plan.base,
        "tensors": written,
        "dtype": plan_dtype(t for c in plan.components for t in c.tensors),
        "dropped": plan.dropped,
        "prediction_type": plan.prediction_type,
        "tokenizer": origin,
        "warnings": plan.warnings,
    }
