"""Flux.1's LoRA targets: the diffusers `FluxTransformer2DModel` modules, CLIP-L and T5-XXL, and the BFL names.

The canonical form keys every Flux module by its diffusers path (`transformer.transformer_blocks.0.attn.to_q`).
BFL names (kohya, ComfyUI, XLabs files) are either one of those modules under another name or a fused
projection whose rows are pieces of several of them (qkv, linear1, the final layer's swapped halves;
FLUX.md §1.2-1.3). Each `FusedModule` says which rows go where; the tables are built from the module list of
a diffusers config (shipped for Flux.1, built on the meta device for any other size).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from adapterzoo.errors import BadFileError
from adapterzoo.formats.families.flux.probe import BASE, KEY_NORM, bfl_prefix
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.safetensors_header import read_header
from adapterzoo.formats.io.tensor_table import table_from_header
from adapterzoo.formats.lora.spellings import layout_spellings, transformer_spellings
from adapterzoo.formats.model.layouts import LayoutBuilder, Spellings
from adapterzoo.formats.model.module_tables import CLIP_CLASS, T5_CLASS, ModuleTable, module_table, saved_config
from adapterzoo.formats.model.targets import (
    TRANSFORMER,
    Architecture,
    FusedModule,
    KohyaConvention,
    Target,
    flatten,
)

FLUX_CLASS = "FluxTransformer2DModel"
CLIP_L = "text_encoder"
T5 = "text_encoder_2"

# diffusers FluxTransformer2DModel config of FLUX.1-dev; schnell differs only in guidance_embeds.
FLUX_DEV_CONFIG = {
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
CLIP_L_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "projection_dim": 768, "hidden_act": "quick_gelu"}
T5_XXL_CONFIG = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
                 "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}

# kohya-family prefixes per component (the first is written): sd-scripts writes lora_te3 for T5, OneTrainer
# lora_te2; OneTrainer and SimpleTuner spell the transformer as diffusers paths under lora_transformer/lora_unet.
FLUX_CONVENTION = KohyaConvention(
    {TRANSFORMER: ("lora_unet", "lora_transformer"), CLIP_L: ("lora_te1", "lora_te"), T5: ("lora_te3", "lora_te2")},
    "bfl",
)


@dataclass(frozen=True)
class FluxArchitecture(Architecture):
    """Flux targets plus BFL's Linears in its order (each a target renamed or a fused projection)."""

    bfl: tuple[FusedModule, ...] = ()


def bfl_modules(targets: dict[str, Target]) -> list[FusedModule]:
    """BFL's Linears (FLUX.md §1.2) for the transformer whose targets are given; any width, any depth."""
    layout = LayoutBuilder(targets)
    add = layout.add
    add("img_in", "x_embedder")
    add("txt_in", "context_embedder")
    for bfl, embedder in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                          ("guidance_in", "guidance_embedder")):
        add(f"{bfl}.in_layer", f"time_text_embed.{embedder}.linear_1")
        add(f"{bfl}.out_layer", f"time_text_embed.{embedder}.linear_2")
    for n in layout.blocks("transformer_blocks"):
        d, b = f"double_blocks.{n}", f"transformer_blocks.{n}"
        add(f"{d}.img_attn.qkv", f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v")
        add(f"{d}.img_attn.proj", f"{b}.attn.to_out.0")
        add(f"{d}.img_mlp.0", f"{b}.ff.net.0.proj")
        add(f"{d}.img_mlp.2", f"{b}.ff.net.2")
        add(f"{d}.img_mod.lin", f"{b}.norm1.linear")
        add(f"{d}.txt_attn.qkv", f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj")
        add(f"{d}.txt_attn.proj", f"{b}.attn.to_add_out")
        add(f"{d}.txt_mlp.0", f"{b}.ff_context.net.0.proj")
        add(f"{d}.txt_mlp.2", f"{b}.ff_context.net.2")
        add(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear")
    for n in layout.blocks("single_transformer_blocks"):
        s, b = f"single_blocks.{n}", f"single_transformer_blocks.{n}"
        add(f"{s}.linear1", f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp")
        add(f"{s}.linear2", f"{b}.proj_out")
        add(f"{s}.modulation.lin", f"{b}.norm.linear")
    add("final_layer.linear", "proj_out")
    add("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return layout.modules


def _xlabs_slots(bfl: dict[str, FusedModule]) -> dict[str, FusedModule]:
    """XLabs processor slots (FLUX.md §3.4); a single block's `qkv_lora` is linear1's q, k, v rows only."""
    slots: dict[str, FusedModule] = {}
    for name, module in bfl.items():
        if m := re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_attn\.(qkv|proj)", name):
            stream = "1" if m[2] == "img" else "2"
            slots[f"double_blocks.{m[1]}.processor.{m[3]}_lora{stream}"] = module
        elif m := re.fullmatch(r"single_blocks\.(\d+)\.linear([12])", name):
            if m[2] == "2":
                slots[f"single_blocks.{m[1]}.processor.proj_lora"] = module
            else:
                qkv = module.parts[:3]
                slots[f"single_blocks.{m[1]}.processor.qkv_lora"] = FusedModule(
                    f"{name}[qkv]", (qkv[-1][1][0][1], module.shape[1]), qkv)
    return slots


def _target_spellings(target: Target, rel: str) -> list[str]:
    if target.component == TRANSFORMER:
        return transformer_spellings(target)
    if target.component == CLIP_L:
        names = [target.path, f"{CLIP_L}.text_model.{rel}", f"text_encoders.clip_l.transformer.text_model.{rel}"]
        return names + [f"{p}_text_model_{flatten(rel)}" for p in FLUX_CONVENTION.prefixes[CLIP_L]]
    return [target.path, f"text_encoders.t5xxl.transformer.{rel}"] + [
        f"{p}_{flatten(rel)}" for p in FLUX_CONVENTION.prefixes[T5]]


def flux_architecture_from_tables(tables: dict[str, ModuleTable]) -> FluxArchitecture:
    """Targets of the components given ({"transformer": ..., "text_encoder": ..., "text_encoder_2": ...})."""
    targets: dict[str, Target] = {}
    spellings = Spellings()
    for component, table in tables.items():
        for module_path, shape in table.modules:
            rel = module_path.removeprefix("text_model.") if component == CLIP_L else module_path
            target = Target(f"{component}.{rel}", component, module_path, None, shape)
            targets[target.path] = target
            for name in _target_spellings(target, rel):
                spellings.alias(name, target.path)
    bfl = bfl_modules(targets)
    for module in bfl:
        spellings.layout(module, layout_spellings(module.name))
    for slot, module in _xlabs_slots({m.name: m for m in bfl}).items():
        spellings.layout(module, [slot])
    return FluxArchitecture(BASE, targets, spellings.aliases, FLUX_CONVENTION, spellings.fused, bfl=tuple(bfl))


@functools.cache
def flux_architecture() -> FluxArchitecture:
    """Flux.1-dev at its real size with CLIP-L and T5-XXL (schnell LoRAs fit it: it only lacks guidance_in)."""
    return flux_architecture_from_tables({
        TRANSFORMER: module_table(FLUX_CLASS, FLUX_DEV_CONFIG),
        CLIP_L: module_table(CLIP_CLASS, CLIP_L_CONFIG),
        T5: module_table(T5_CLASS, T5_XXL_CONFIG),
    })


# -- Flux models on disk (convert --checkpoint) ---------------------------------------------------------

_TEXT_ENCODER_CLASSES = {CLIP_L: (CLIP_CLASS,), T5: (T5_CLASS,)}


def _with_builtin_text_encoders(tables: dict[str, ModuleTable]) -> dict[str, ModuleTable]:
    """`tables` with Flux.1's own CLIP-L and T5-XXL where the model on disk has none (a BFL file, a bare
    transformer folder): every Flux.1 uses those two, so a LoRA's text-encoder names resolve without them."""
    builtin = {CLIP_L: (CLIP_CLASS, CLIP_L_CONFIG), T5: (T5_CLASS, T5_XXL_CONFIG)}
    return tables | {component: module_table(*spec) for component, spec in builtin.items() if component not in tables}


def flux_checkpoint_architecture(path: str | Path) -> FluxArchitecture | None:
    """The targets of a Flux model on disk (a diffusers transformer or pipeline folder of any size, or a BFL
    single file), its text encoders taken from the built-in table where it has none; None if `path` is not a
    Flux model."""
    path = Path(path)
    if path.is_file():
        config = bfl_config_from_file(path)
        if config is None:
            return None
        return flux_architecture_from_tables(_with_builtin_text_encoders({TRANSFORMER: module_table(FLUX_CLASS, config)}))
    if (path / "config.json").is_file():
        config = read_json_object(path / "config.json")
        if config.get("_class_name") != FLUX_CLASS:
            return None
        tables = {TRANSFORMER: module_table(FLUX_CLASS, saved_config(config))}
        return flux_architecture_from_tables(_with_builtin_text_encoders(tables))
    index_path = path / "model_index.json"
    if not index_path.is_file() or read_json_object(index_path).get("transformer", [None, None])[1] != FLUX_CLASS:
        return None
    index = read_json_object(index_path)
    transformer = saved_config(read_json_object(path / TRANSFORMER / "config.json"))
    tables = {TRANSFORMER: module_table(FLUX_CLASS, transformer)}
    for component, classes in _TEXT_ENCODER_CLASSES.items():
        entry = index.get(component)
        if isinstance(entry, list) and len(entry) == 2 and entry[1] in classes:
            config = read_json_object(path / component / "config.json")
            tables[component] = module_table(entry[1], saved_config(config))
    return flux_architecture_from_tables(_with_builtin_text_encoders(tables))


def bfl_config_from_file(path: Path) -> dict | None:
    """A FluxTransformer2DModel config from a BFL single file's shapes (FLUX.md §1.4); None if not Flux.1."""
    try:
        table = table_from_header(read_header(path))
    except BadFileError:  # not a safetensors file: not a Flux checkpoint this reads
        return None
    shapes = {k: tuple(v.shape) for k, v in table.items()}
    prefix = bfl_prefix(shapes)
    if prefix is None:
        return None
    return bfl_config_from_shapes({k[len(prefix):]: tuple(v.shape) for k, v in table.items() if k.startswith(prefix)})


def axes_dims_rope(head_dim: int) -> list[int]:
    """Flux's (16, 56, 56) for head_dim 128; otherwise even parts in about that proportion summing to head_dim
    (no weight says; the rope only has to fit the heads)."""
    if head_dim == 128:
        return list(FLUX_DEV_CONFIG["axes_dims_rope"])
    if head_dim % 4:
        raise BadFileError(f"attention head dim {head_dim} cannot be split into Flux's three even rope axes")
    first = 2 * max(1, round(head_dim / 16))
    if (head_dim - first) % 4:
        first += 2
    return [first, (head_dim - first) // 2, (head_dim - first) // 2]


def bfl_config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The config of a BFL transformer whose tensors (bare BFL names) have these shapes."""
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[KEY_NORM][0]

    def count(blocks: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(blocks + ".")})

    config = {
        **FLUX_DEV_CONFIG, "in_channels": in_channels, "num_layers": count("double_blocks"),
        "num_single_layers": count("single_blocks"), "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim, "axes_dims_rope": axes_dims_rope(head_dim), "joint_attention_dim": shapes["txt_in.weight"][1],
        "pooled_projection_dim": shapes["vector_in.in_layer.weight"][1],
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }
    out_channels = shapes["final_layer.linear.weight"][0]
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    return config
