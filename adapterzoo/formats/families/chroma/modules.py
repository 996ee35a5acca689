"""Chroma's LoRA targets: the diffusers `ChromaTransformer2DModel` modules and their BFL names.

Chroma is FLUX.1-schnell with the per-block modulation Linears pruned and one "distilled guidance layer" (an
MLP approximator) computing every modulation instead. Its blocks keep Flux.1's modules and BFL names, so the
BFL layout is Flux.1's (`families.flux.modules.bfl_modules`, which skips what a model lacks) plus the
approximator's. The module table is written out from the config in plain Python (a test holds it equal to
diffusers' own).
"""

from __future__ import annotations

import functools

from adapterzoo.formats.families.flux.modules import FLUX_CONVENTION, FluxArchitecture, bfl_modules
from adapterzoo.formats.lora.spellings import spelled_transformer
from adapterzoo.formats.model.layouts import LayoutBuilder
from adapterzoo.formats.model.module_tables import ModuleTable
from adapterzoo.formats.model.targets import FusedModule, Target

BASE = "chroma"
CHROMA_CLASS = "ChromaTransformer2DModel"
APPROXIMATOR = "distilled_guidance_layer"
# lodestones/Chroma1-HD transformer/config.json (the fields ChromaTransformer2DModel takes)
CONFIG = {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
          "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
          "axes_dims_rope": [16, 56, 56], "approximator_num_channels": 64, "approximator_hidden_dim": 5120,
          "approximator_layers": 5}


def module_table(config: dict) -> ModuleTable:
    """(module path, weight shape) of every module of a ChromaTransformer2DModel with this config, in its order."""
    h, head = config["num_attention_heads"] * config["attention_head_dim"], config["attention_head_dim"]
    mlp, hidden = 4 * h, config["approximator_hidden_dim"]
    out = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    rows: list[tuple[str, tuple[int, ...]]] = [(f"{APPROXIMATOR}.in_proj", (hidden, config["approximator_num_channels"]))]
    for n in range(config["approximator_layers"]):
        rows += [(f"{APPROXIMATOR}.layers.{n}.linear_1", (hidden, hidden)),
                 (f"{APPROXIMATOR}.layers.{n}.linear_2", (hidden, hidden))]
    rows += [(f"{APPROXIMATOR}.norms.{n}", (hidden,)) for n in range(config["approximator_layers"])]
    rows += [(f"{APPROXIMATOR}.out_proj", (h, hidden)), ("context_embedder", (h, config["joint_attention_dim"])),
             ("x_embedder", (h, config["in_channels"]))]
    square = (h, h)
    for n in range(config["num_layers"]):
        a = f"transformer_blocks.{n}.attn"
        rows += [(f"{a}.norm_q", (head,)), (f"{a}.norm_k", (head,)), (f"{a}.to_q", square), (f"{a}.to_k", square),
                 (f"{a}.to_v", square), (f"{a}.to_out.0", square), (f"{a}.norm_added_q", (head,)),
                 (f"{a}.norm_added_k", (head,)), (f"{a}.add_q_proj", square), (f"{a}.add_k_proj", square),
                 (f"{a}.add_v_proj", square), (f"{a}.to_add_out", square)]
        for ff in ("ff", "ff_context"):
            rows += [(f"transformer_blocks.{n}.{ff}.net.0.proj", (mlp, h)), (f"transformer_blocks.{n}.{ff}.net.2", (h, mlp))]
    for n in range(config["num_single_layers"]):
        b = f"single_transformer_blocks.{n}"
        rows += [(f"{b}.proj_mlp", (mlp, h)), (f"{b}.proj_out", (h, h + mlp)), (f"{b}.attn.norm_q", (head,)),
                 (f"{b}.attn.norm_k", (head,)), (f"{b}.attn.to_q", square), (f"{b}.attn.to_k", square),
                 (f"{b}.attn.to_v", square)]
    rows.append(("proj_out", (out, h)))
    return ModuleTable(tuple(rows), {})


def chroma_bfl_modules(targets: dict[str, Target]) -> list[FusedModule]:
    """BFL's Linears of a Chroma transformer: Flux.1's that it keeps, then the approximator's."""
    layout = LayoutBuilder(targets)
    layout.modules = bfl_modules(targets)
    for name in ("in_proj", "out_proj"):
        layout.add(f"{APPROXIMATOR}.{name}", f"{APPROXIMATOR}.{name}")
    for n in layout.blocks(f"{APPROXIMATOR}.layers"):
        layout.add(f"{APPROXIMATOR}.layers.{n}.in_layer", f"{APPROXIMATOR}.layers.{n}.linear_1")
        layout.add(f"{APPROXIMATOR}.layers.{n}.out_layer", f"{APPROXIMATOR}.layers.{n}.linear_2")
    return layout.modules


def architecture_from_table(table: ModuleTable) -> FluxArchitecture:
    """The targets of a Chroma transformer with this module table, spelled every way its trainers write them."""
    targets, spellings, bfl = spelled_transformer(table, chroma_bfl_modules)
    return FluxArchitecture(BASE, targets, spellings.aliases, FLUX_CONVENTION, spellings.fused, bfl=bfl)


@functools.cache
def builtin_architecture() -> FluxArchitecture:
    """Chroma1 (HD, Base, Flash: one shape) at its real size."""
    return architecture_from_table(module_table(CONFIG))
