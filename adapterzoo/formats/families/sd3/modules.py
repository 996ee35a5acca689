"""SD3/SD3.5 LoRA targets: the diffusers `SD3Transformer2DModel` modules, CLIP-L, CLIP-G and T5-XXL, and SAI's
single-file names for them.

The canonical form keys every module by its diffusers path. SAI's layout (kohya's and ComfyUI's LoRAs, the
single files) names each Linear of the MMDiT otherwise, and fuses q, k and v into one `qkv` per stream; the
final modulations store (shift, scale) where diffusers has (scale, shift). Each such Linear is a `FusedModule`
saying which rows of which targets make it, built from the module table of a config (shipped configs of the
three releases below, or one read from a single file's shapes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from adapterzoo.errors import BadFileError
from adapterzoo.formats.families.sd3.probe import COMFY_PREFIX, LARGE, MEDIUM, SD3, TURBO
from adapterzoo.formats.lora.lora_parts import PEFT_PREFIX
from adapterzoo.formats.model.layouts import LayoutBuilder, Spellings
from adapterzoo.formats.model.module_tables import (
    CLIP_CLASS,
    CLIP_PROJECTION_CLASS,
    T5_CLASS,
    ModuleTable,
    module_table,
)
from adapterzoo.formats.model.targets import TRANSFORMER, Architecture, FusedModule, KohyaConvention, Target, flatten

MMDIT_CLASS = "SD3Transformer2DModel"
CLIP_L, CLIP_G, T5 = "text_encoder", "text_encoder_2", "text_encoder_3"

_COMMON = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
           "joint_attention_dim": 4096, "pooled_projection_dim": 2048}
# The transformer/config.json of stabilityai's stable-diffusion-3-medium-diffusers, -3.5-large (and -large-turbo)
# and -3.5-medium.
CONFIGS = {
    SD3: {**_COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
          "pos_embed_max_size": 192},
    LARGE: {**_COMMON, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
            "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    MEDIUM: {**_COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
             "pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": list(range(13))},
}
# The pipelines' text encoders: CLIP-L and OpenCLIP bigG (SDXL's two) and T5-XXL.
TEXT_ENCODERS = {
    CLIP_L: (CLIP_CLASS, {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}),
    CLIP_G: (CLIP_PROJECTION_CLASS, {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                     "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}),
    T5: (T5_CLASS, {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                    "num_heads": 64, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}),
}
# sd-scripts' lora_sd3 prefixes (ComfyUI reads the same); OneTrainer and SimpleTuner spell the transformer's
# diffusers paths under lora_transformer.
CONVENTION = KohyaConvention(
    {TRANSFORMER: ("lora_unet", "lora_transformer"), CLIP_L: ("lora_te1",), CLIP_G: ("lora_te2",), T5: ("lora_te3",)},
    "sai",
)
COMFY_ENCODERS = {CLIP_L: "text_encoders.clip_l.transformer.", CLIP_G: "text_encoders.clip_g.transformer.",
                  T5: "text_encoders.t5xxl.transformer."}


@dataclass(frozen=True)
class Sd3Architecture(Architecture):
    """SD3 targets plus SAI's Linears in its order (each a target renamed, q/k/v fused, or halves swapped)."""

    sai: tuple[FusedModule, ...] = ()


def _sai_modules(targets: dict[str, Target]) -> list[FusedModule]:
    """SAI's Linears of the transformer whose targets are given, any width and depth (single_file_utils'
    convert_sd3_transformer_checkpoint_to_diffusers, read backwards)."""
    sai = LayoutBuilder(targets)
    sai.add("x_embedder.proj", "pos_embed.proj")
    sai.add("context_embedder", "context_embedder")
    for theirs, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
        sai.add(f"{theirs}.mlp.0", f"time_text_embed.{ours}.linear_1")
        sai.add(f"{theirs}.mlp.2", f"time_text_embed.{ours}.linear_2")
    blocks = sai.blocks("transformer_blocks")
    for n in blocks:
        x, c, b = f"joint_blocks.{n}.x_block", f"joint_blocks.{n}.context_block", f"transformer_blocks.{n}"
        for attn in ("attn", "attn2"):
            sai.add(f"{x}.{attn}.qkv", f"{b}.{attn}.to_q", f"{b}.{attn}.to_k", f"{b}.{attn}.to_v")
            sai.add(f"{x}.{attn}.proj", f"{b}.{attn}.to_out.0")
        sai.add(f"{x}.mlp.fc1", f"{b}.ff.net.0.proj")
        sai.add(f"{x}.mlp.fc2", f"{b}.ff.net.2")
        sai.add(f"{x}.adaLN_modulation.1", f"{b}.norm1.linear")
        sai.add(f"{c}.attn.qkv", f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj")
        sai.add(f"{c}.attn.proj", f"{b}.attn.to_add_out")
        sai.add(f"{c}.mlp.fc1", f"{b}.ff_context.net.0.proj")
        sai.add(f"{c}.mlp.fc2", f"{b}.ff_context.net.2")
        # the last context block is "pre only": its (shift, scale) modulation is diffusers' (scale, shift)
        sai.add(f"{c}.adaLN_modulation.1", f"{b}.norm1_context.linear", swap=n == blocks[-1])
    sai.add("final_layer.linear", "proj_out")
    sai.add("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return sai.modules


def _spellings(target: Target) -> list[str]:
    """Every name a file gives a diffusers-path target: diffusers/PEFT, kohya-flattened (OneTrainer, SimpleTuner's
    LyCORIS), ComfyUI's text encoders."""
    rel = target.path[len(target.component) + 1:]
    if target.component == TRANSFORMER:
        return [target.path, rel, PEFT_PREFIX + rel, f"lora_transformer_{flatten(rel)}", f"lycoris_{flatten(rel)}"]
    inner = f"text_model.{rel}" if target.component in (CLIP_L, CLIP_G) else rel  # T5: encoder.block...
    prefix = CONVENTION.prefixes[target.component][0]
    return [target.path, f"{target.component}.{inner}", f"{prefix}_{flatten(inner)}", COMFY_ENCODERS[target.component]
            + inner]


def sai_spellings(name: str) -> list[str]:
    """Every way a file names an SAI Linear: kohya, ComfyUI, bare, and PEFT's prefix."""
    return [f"lora_unet_{flatten(name)}", COMFY_PREFIX + name, name, PEFT_PREFIX + name]


def architecture_from_tables(base: str, tables: dict[str, ModuleTable], variant: str | None = None) -> Sd3Architecture:
    """Targets of the components given ({"transformer": ..., "text_encoder": ...}), any size."""
    targets: dict[str, Target] = {}
    names = Spellings()
    for component, table in tables.items():
        for module_path, shape in table.modules:
            rel = module_path.removeprefix("text_model.") if component in (CLIP_L, CLIP_G) else module_path
            target = Target(f"{component}.{rel}", component, module_path, None, shape)
            targets[target.path] = target
            for name in _spellings(target):
                names.alias(name, target.path)
    sai = _sai_modules(targets)
    for module in sai:
        names.layout(module, sai_spellings(module.name))
    return Sd3Architecture(base, targets, names.aliases, CONVENTION, names.fused, variant=variant, sai=tuple(sai))


def release_variant(base: str, variant: str | None) -> str:
    """Which release's config a base and variant read against: SD3 Medium, SD3.5 Large (and Turbo) or Medium."""
    return SD3 if base == SD3 else MEDIUM if variant == MEDIUM else LARGE


@functools.cache
def builtin_architecture(base: str, variant: str | None = None) -> Sd3Architecture:
    """A release at its real size with its three text encoders."""
    release = release_variant(base, variant)
    tables = {TRANSFORMER: module_table(MMDIT_CLASS, CONFIGS[release])}
    tables |= {component: module_table(cls, config) for component, (cls, config) in TEXT_ENCODERS.items()}
    return architecture_from_tables(base, tables, None if release == SD3 else TURBO if variant == TURBO else release)


def config_from_sai(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The SD3Transformer2DModel config of an SAI-layout transformer whose tensors (bare names) have these shapes."""
    try:
        width, in_channels, patch, _ = shapes["x_embedder.proj.weight"]
        depth = len({k.split(".")[1] for k in shapes if k.startswith("joint_blocks.")})
        qk = "joint_blocks.0.x_block.attn.ln_q.weight" in shapes
        head_dim = shapes["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk else 64 if width % 64 == 0 else width
        config = {
            "sample_size": 128, "patch_size": patch, "in_channels": in_channels, "num_layers": depth,
            "attention_head_dim": head_dim, "num_attention_heads": width // head_dim,
            "joint_attention_dim": shapes["context_embedder.weight"][1],
            "caption_projection_dim": shapes["context_embedder.weight"][0],
            "pooled_projection_dim": shapes["y_embedder.mlp.0.weight"][1],
            "out_channels": shapes["final_layer.linear.weight"][0] // (patch * patch),
            "pos_embed_max_size": math.isqrt(shapes["pos_embed"][1]) if "pos_embed" in shapes else 192,
        }
    except (KeyError, ValueError) as missing:
        raise BadFileError(f"an SD3 single file without the tensor {missing}: not one this reads") from None
    dual = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.") and ".x_block.attn2." in k})
    if qk:
        config["qk_norm"] = "rms_norm"
    if dual:
        config["dual_attention_layers"] = dual
    return config
