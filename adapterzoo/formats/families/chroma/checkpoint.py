"""Chroma transformer checkpoints (`LAYOUT`): a BFL single file (lodestones' releases, ComfyUI's diffusion_models) or a file
of diffusers-named tensors <-> a diffusers `ChromaTransformer2DModel` folder, any size, config from shapes; and
where each LoRA target lives in any of them. The BFL layout is Flux.1's without modulations, plus the
approximator (diffusers' own converter, `convert_chroma_transformer_checkpoint_to_diffusers`, is the reference).
"""

from __future__ import annotations

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.layout_checkpoint import LayoutTensor, SingleFileLayout, layout_tensors, renamed
from adapterzoo.formats.families.chroma.modules import (
    APPROXIMATOR,
    BASE,
    CHROMA_CLASS,
    CONFIG,
    architecture_from_table,
    module_table,
)
from adapterzoo.formats.families.chroma.probe import checkpoint_prefix
from adapterzoo.formats.families.flux.checkpoint import bfl_norm_tensors
from adapterzoo.formats.families.flux.modules import axes_dims_rope
from adapterzoo.formats.model.layouts import block_count

TITLE = "Chroma"
BFL_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
# (BFL name, diffusers name) of the tensors whose shapes give the config
_NAMES = {"embed": ("img_in.weight", "x_embedder.weight"), "context": ("txt_in.weight", "context_embedder.weight"),
          "norm": (BFL_MARKER, "transformer_blocks.0.attn.norm_k.weight"),
          "final": ("final_layer.linear.weight", "proj_out.weight"), "double": ("double_blocks.", "transformer_blocks."),
          "single": ("single_blocks.", "single_transformer_blocks."), "layers": ("in_layer", "linear_1")}


def config_from_shapes(bare: dict[str, tuple[int, ...]]) -> dict:
    """The ChromaTransformer2DModel config of a transformer whose tensors (BFL or diffusers names) have these shapes."""
    names = {key: pair[0 if BFL_MARKER in bare else 1] for key, pair in _NAMES.items()}
    try:
        hidden, in_channels = bare[names["embed"]]
        head = bare[names["norm"]][0]
        approximator, channels = bare[f"{APPROXIMATOR}.in_proj.weight"]
        config = {**CONFIG, "in_channels": in_channels, "num_layers": block_count(bare, names["double"]),
                  "num_single_layers": block_count(bare, names["single"]), "attention_head_dim": head,
                  "num_attention_heads": hidden // head, "joint_attention_dim": bare[names["context"]][1],
                  "axes_dims_rope": axes_dims_rope(head), "approximator_num_channels": channels,
                  "approximator_hidden_dim": approximator,
                  "approximator_layers": block_count(bare, f"{APPROXIMATOR}.layers.")}
        out_channels = bare[names["final"]][0]
    except KeyError as missing:
        raise BadFileError(f"not a whole Chroma transformer: no {missing.args[0]}") from None
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    return config


def bfl_tensors(config: dict) -> list[LayoutTensor]:
    """Every tensor of the BFL single file of a ChromaTransformer2DModel with this config."""
    architecture = architecture_from_table(module_table(config))
    hidden = config["approximator_hidden_dim"]
    norms = [renamed(f"{APPROXIMATOR}.norms.{n}.scale", f"{APPROXIMATOR}.norms.{n}.weight", hidden)
             for n in range(config["approximator_layers"])]
    return layout_tensors(architecture.bfl) + bfl_norm_tensors(config) + norms


def _tensors(config: dict, shapes: dict, layout_names: bool) -> list[LayoutTensor]:
    return bfl_tensors(config)


def _folder_config(config: dict) -> dict:
    """Without the fields old Chroma folders carry that the class does not take (guidance_embeds)."""
    return {**CONFIG, **{k: v for k, v in config.items() if k in CONFIG}}


LAYOUT = SingleFileLayout(BASE, TITLE, CHROMA_CLASS, BFL_MARKER, checkpoint_prefix, config_from_shapes, _tensors,
                          lambda architecture: architecture.bfl,
                          lambda config: architecture_from_table(module_table(config)), _folder_config)
