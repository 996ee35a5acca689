"""The real module list of each base model a LoRA can target, and every spelling of each module.

Flattened kohya names cannot be un-flattened by string rules (`to_q`, `transformer_blocks`), so the
names a file may use are generated from the architecture's real modules and looked up (FORMATS.md
§1.2; what kohya, A1111 and ComfyUI do). Real-size tables are built from the SD1.5 / SD2.1 / SDXL
configs written below, instantiated on the `meta` device: no weights, no hub. Tiny test models get
the same table from `architecture_from_models`. A new base (Flux) is one more config + convention.
The module lists themselves come from `module_tables`, which ships the built-in ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.model.module_tables import (
    CLIP_CLASS,
    CLIP_PROJECTION_CLASS,
    UNET_CLASS,
    ModuleTable,
    module_table,
    table_of,
)
from adapterzoo.formats.model.unet_names import diffusers_to_ldm_module, layout_from_config

UNET = "unet"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# Real diffusers UNet2DConditionModel configs (runwayml SD1.5, stabilityai SD2.1, SDXL base 1.0).
UNET_CONFIGS: dict[str, dict] = {
    "sd1": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768, "attention_head_dim": 8,
    },
    "sd2": {
        "sample_size": 96, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
    },
    "sdxl": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20), "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "projection_dim": 768, "hidden_act": "quick_gelu"}
# (config, with projection head) per text encoder; SD2's OpenCLIP-H keeps 23 of its 24 layers in diffusers.
TEXT_ENCODER_CONFIGS: dict[str, dict[str, tuple[dict, bool]]] = {
    "sd1": {"text_encoder": (_CLIP_L, False)},
    "sd2": {"text_encoder": ({"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                              "num_attention_heads": 16, "projection_dim": 512, "hidden_act": "gelu"}, False)},
    "sdxl": {
        "text_encoder": (_CLIP_L, False),
        "text_encoder_2": ({"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                            "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}, True),
    },
}


@dataclass(frozen=True)
class KohyaConvention:
    """How kohya-family files name modules for one base: prefixes per component, UNet spelling."""

    prefixes: dict[str, tuple[str, ...]]  # component -> prefixes accepted on read; the first is written
    unet_naming: str  # "diffusers" (kohya trains SD1/SD2 on the diffusers UNet) or "ldm" (SDXL)


KOHYA_CONVENTIONS = {
    "sd1": KohyaConvention({UNET: ("lora_unet",), "text_encoder": ("lora_te", "lora_te1")}, "diffusers"),
    "sd2": KohyaConvention({UNET: ("lora_unet",), "text_encoder": ("lora_te", "lora_te1")}, "diffusers"),
    "sdxl": KohyaConvention(
        {UNET: ("lora_unet",), "text_encoder": ("lora_te1",), "text_encoder_2": ("lora_te2",)}, "ldm"
    ),
}


@dataclass(frozen=True)
class Target:
    """One module a LoRA can change."""

    path: str  # canonical: component prefix + diffusers path, text encoders without `text_model.`
    component: str
    module_path: str  # as the component's own model names it (what PEFT and diffusers key on)
    ldm_path: str | None  # UNet modules: the LDM spelling (FORMATS.md §2.1)
    shape: tuple[int, ...]  # the module's weight: 2-D Linear, 4-D Conv2d, 1-D norm


@dataclass(frozen=True)
class Architecture:
    """Targets in module order plus a map from every accepted spelling to a canonical path."""

    base: str
    targets: dict[str, Target]
    aliases: dict[str, str]
    convention: KohyaConvention

    def resolve(self, name: str) -> Target | None:
        path = self.aliases.get(name)
        return None if path is None else self.targets[path]

    def kohya_name(self, target: Target) -> str:
        """The flattened name kohya's trainer would write for this base."""
        prefix = self.convention.prefixes[target.component][0]
        if target.component == UNET:
            ldm = self.convention.unet_naming == "ldm" and target.ldm_path
            spelled = target.ldm_path if ldm else target.module_path
        else:
            spelled = "text_model." + relative(target)
        return f"{prefix}_{flatten(spelled)}"


def flatten(path: str) -> str:
    return path.replace(".", "_")


def relative(target: Target) -> str:
    """The canonical path without its component prefix."""
    return target.path[len(target.component) + 1:]


def _spellings(target: Target, convention: KohyaConvention) -> list[str]:
    rel = relative(target)
    names = [target.path, f"{target.component}.{target.module_path}"]
    if target.component == UNET:
        names.append(target.module_path)  # old attention-processor files carry no component prefix
        kohya = [target.module_path] + ([target.ldm_path] if target.ldm_path else [])
    else:
        names.append(f"{target.component}.text_model.{rel}")
        kohya = ["text_model." + rel, rel]
    for prefix in convention.prefixes.get(target.component, ()):
        names.extend(f"{prefix}_{flatten(spelled)}" for spelled in kohya)
    return names


def _component_targets(component: str, table: ModuleTable) -> list[Target]:
    layout = layout_from_config(table.config) if component == UNET else None
    targets = []
    for module_path, shape in table.modules:
        rel = module_path.removeprefix("text_model.") if component != UNET else module_path
        ldm = diffusers_to_ldm_module(module_path, layout) if layout is not None else None
        targets.append(Target(f"{component}.{rel}", component, module_path, ldm, shape))
    return targets


def architecture_from_tables(base: str, tables: dict[str, ModuleTable]) -> Architecture:
    """Table of a concrete set of components ({"unet": ..., "text_encoder": ...}), in that order; any size."""
    if base not in KOHYA_CONVENTIONS:
        raise AdapterzooError(f"no architecture table for base {base!r} (have: {', '.join(KOHYA_CONVENTIONS)})")
    convention = KOHYA_CONVENTIONS[base]
    targets: dict[str, Target] = {}
    aliases: dict[str, str] = {}
    for component, table in tables.items():
        for target in _component_targets(component, table):
            targets[target.path] = target
            for name in _spellings(target, convention):
                if aliases.setdefault(name, target.path) != target.path:
                    raise ValueError(f"{name} spells both {aliases[name]} and {target.path}")
    return Architecture(base, targets, aliases, convention)


def architecture_from_models(base: str, models: dict[str, torch.nn.Module]) -> Architecture:
    """Table of models at hand (tiny test models); any device."""
    return architecture_from_tables(base, {component: table_of(model) for component, model in models.items()})


@functools.cache
def builtin_architecture(base: str) -> Architecture:
    """The real-size table of sd1, sd2, sdxl (from the configs above) or flux (`flux_modules`)."""
    if base == "flux":
        from adapterzoo.formats.model.flux_modules import flux_architecture

        return flux_architecture()
    if base not in UNET_CONFIGS:
        raise AdapterzooError(f"no architecture table for base {base!r} (have: {', '.join(UNET_CONFIGS)})")
    tables = {UNET: module_table(UNET_CLASS, UNET_CONFIGS[base])}
    for component, (config, projection) in TEXT_ENCODER_CONFIGS[base].items():
        tables[component] = module_table(CLIP_PROJECTION_CLASS if projection else CLIP_CLASS, config)
    return architecture_from_tables(base, tables)
