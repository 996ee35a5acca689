"""SD1/SD2/SDXL LoRA targets: the UNet and CLIP text encoders, and every name kohya, A1111, diffusers and PEFT
give each module.

Real-size tables come from the SD1.5 / SD2.1 / SDXL configs written below (shipped in
data/module_tables.json.gz, else instantiated on the `meta` device: no weights, no hub); tiny and
non-standard models get theirs from their own tables (`architecture_from_tables`).
"""

from __future__ import annotations

import functools

from adapterzoo.formats.model.module_tables import (
    CLIP_CLASS,
    CLIP_PROJECTION_CLASS,
    UNET_CLASS,
    ModuleTable,
    module_table,
)
from adapterzoo.formats.model.targets import UNET, Architecture, KohyaConvention, Target, flatten, relative
from adapterzoo.formats.model.unet_names import diffusers_to_ldm_module, layout_from_config

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

# kohya trains SD1/SD2 on the diffusers UNet and names SDXL's by its LDM single-file names.
KOHYA_CONVENTIONS = {
    "sd1": KohyaConvention({UNET: ("lora_unet",), "text_encoder": ("lora_te", "lora_te1")}, "diffusers"),
    "sd2": KohyaConvention({UNET: ("lora_unet",), "text_encoder": ("lora_te", "lora_te1")}, "diffusers"),
    "sdxl": KohyaConvention(
        {UNET: ("lora_unet",), "text_encoder": ("lora_te1",), "text_encoder_2": ("lora_te2",)}, "ldm"
    ),
}


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
    """Targets of a concrete set of components ({"unet": ..., "text_encoder": ...}), in that order; any size."""
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


@functools.cache
def builtin_architecture(base: str) -> Architecture:
    """The real-size targets of a base, from the configs above."""
    tables = {UNET: module_table(UNET_CLASS, UNET_CONFIGS[base])}
    for component, (config, projection) in TEXT_ENCODER_CONFIGS[base].items():
        tables[component] = module_table(CLIP_PROJECTION_CLASS if projection else CLIP_CLASS, config)
    return architecture_from_tables(base, tables)
