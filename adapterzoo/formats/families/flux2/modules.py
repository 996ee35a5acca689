"""Flux.2's LoRA targets: the diffusers `Flux2Transformer2DModel` modules and the BFL names of its single files.

The module table is written out here from the config in plain Python (what `Flux2Transformer2DModel` builds;
a test holds it equal to diffusers' own on the meta device), so reading a Flux.2 LoRA imports neither torch
nor diffusers. The BFL layout differs from Flux.1's: the double blocks' qkv are row blocks of q, k, v as
there, but a single block's linear1 is diffusers' `to_qkv_mlp_proj` whole (diffusers fuses it too), the
modulations are shared by all blocks, and the final modulation's halves are swapped as in Flux.1.
"""

from __future__ import annotations

import functools

from adapterzoo.formats.families.flux.modules import FLUX_CONVENTION, FluxArchitecture
from adapterzoo.formats.lora.spellings import spelled_transformer
from adapterzoo.formats.model.layouts import LayoutBuilder
from adapterzoo.formats.model.module_tables import ModuleTable
from adapterzoo.formats.model.targets import FusedModule, Target

BASE = "flux2"
FLUX2_CLASS = "Flux2Transformer2DModel"
DEV = "dev"

# Flux2Transformer2DModel configs of the releases: FLUX.2-dev's transformer/config.json, and BFL's Klein4BParams /
# Klein9BParams (flux2 src/flux2/model.py) in diffusers' names; the base and distilled Kleins share theirs.
_COMMON = {"patch_size": 1, "in_channels": 128, "out_channels": None, "attention_head_dim": 128,
           "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
           "eps": 1e-6}
CONFIGS = {
    DEV: {**_COMMON, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48, "joint_attention_dim": 15360,
          "guidance_embeds": True},
    "klein-9b": {**_COMMON, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                 "joint_attention_dim": 12288, "guidance_embeds": False},
    "klein-4b": {**_COMMON, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                 "joint_attention_dim": 7680, "guidance_embeds": False},
}
VARIANT_OF_WIDTH = {c["num_attention_heads"] * c["attention_head_dim"]: v for v, c in CONFIGS.items()}


def module_table(config: dict) -> ModuleTable:
    """(module path, weight shape) of every module of a Flux2Transformer2DModel with this config, in its order."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    head, mlp = config["attention_head_dim"], int(h * config["mlp_ratio"])
    out = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    rows: list[tuple[str, tuple[int, ...]]] = []
    embedders = ("timestep_embedder", "guidance_embedder") if config["guidance_embeds"] else ("timestep_embedder",)
    for embedder in embedders:
        rows += [(f"time_guidance_embed.{embedder}.linear_1", (h, config["timestep_guidance_channels"])),
                 (f"time_guidance_embed.{embedder}.linear_2", (h, h))]
    rows += [("double_stream_modulation_img.linear", (6 * h, h)), ("double_stream_modulation_txt.linear", (6 * h, h)),
             ("single_stream_modulation.linear", (3 * h, h)), ("x_embedder", (h, config["in_channels"])),
             ("context_embedder", (h, config["joint_attention_dim"]))]
    for n in range(config["num_layers"]):
        a, square = f"transformer_blocks.{n}.attn", (h, h)
        rows += [(f"{a}.to_q", square), (f"{a}.to_k", square), (f"{a}.to_v", square), (f"{a}.norm_q", (head,)),
                 (f"{a}.norm_k", (head,)), (f"{a}.to_out.0", square), (f"{a}.norm_added_q", (head,)),
                 (f"{a}.norm_added_k", (head,)), (f"{a}.add_q_proj", square), (f"{a}.add_k_proj", square),
                 (f"{a}.add_v_proj", square), (f"{a}.to_add_out", square)]
        for ff in ("ff", "ff_context"):
            rows += [(f"transformer_blocks.{n}.{ff}.linear_in", (2 * mlp, h)),
                     (f"transformer_blocks.{n}.{ff}.linear_out", (h, mlp))]
    for n in range(config["num_single_layers"]):
        a = f"single_transformer_blocks.{n}.attn"
        rows += [(f"{a}.to_qkv_mlp_proj", (3 * h + 2 * mlp, h)), (f"{a}.norm_q", (head,)), (f"{a}.norm_k", (head,)),
                 (f"{a}.to_out", (h, h + mlp))]
    rows += [("norm_out.linear", (2 * h, h)), ("proj_out", (out, h))]
    return ModuleTable(tuple(rows), {})


def bfl_modules(targets: dict[str, Target]) -> list[FusedModule]:
    """BFL's Linears of a Flux.2 transformer with these targets (flux2 src/flux2/model.py), any size."""
    layout = LayoutBuilder(targets)
    add = layout.add
    add("img_in", "x_embedder")
    add("txt_in", "context_embedder")
    for bfl, embedder in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder")):
        add(f"{bfl}.in_layer", f"time_guidance_embed.{embedder}.linear_1")
        add(f"{bfl}.out_layer", f"time_guidance_embed.{embedder}.linear_2")
    for stream in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        add(f"{stream}.lin", f"{stream}.linear")
    for n in layout.blocks("transformer_blocks"):
        d, b = f"double_blocks.{n}", f"transformer_blocks.{n}"
        add(f"{d}.img_attn.qkv", f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v")
        add(f"{d}.img_attn.proj", f"{b}.attn.to_out.0")
        add(f"{d}.img_mlp.0", f"{b}.ff.linear_in")
        add(f"{d}.img_mlp.2", f"{b}.ff.linear_out")
        add(f"{d}.txt_attn.qkv", f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj")
        add(f"{d}.txt_attn.proj", f"{b}.attn.to_add_out")
        add(f"{d}.txt_mlp.0", f"{b}.ff_context.linear_in")
        add(f"{d}.txt_mlp.2", f"{b}.ff_context.linear_out")
    for n in layout.blocks("single_transformer_blocks"):
        add(f"single_blocks.{n}.linear1", f"single_transformer_blocks.{n}.attn.to_qkv_mlp_proj")
        add(f"single_blocks.{n}.linear2", f"single_transformer_blocks.{n}.attn.to_out")
    add("final_layer.linear", "proj_out")
    add("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return layout.modules


def architecture_from_table(table: ModuleTable, variant: str | None = None) -> FluxArchitecture:
    """The targets of a Flux.2 transformer with this module table, spelled every way its trainers write them."""
    targets, spellings, bfl = spelled_transformer(table, bfl_modules)
    return FluxArchitecture(BASE, targets, spellings.aliases, FLUX_CONVENTION, spellings.fused, variant, bfl)


@functools.cache
def builtin_architecture(variant: str | None) -> FluxArchitecture:
    """A release's real-size targets: dev, klein-4b or klein-9b (dev when the variant is not known)."""
    variant = variant if variant in CONFIGS else DEV
    return architecture_from_table(module_table(CONFIGS[variant]), variant)
