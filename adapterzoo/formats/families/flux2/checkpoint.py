"""Flux.2 transformer checkpoints (`LAYOUT`): a BFL single file (BFL's release, ComfyUI's diffusion_models, with
or without `model.diffusion_model.`) or a file of diffusers-named tensors <-> a diffusers `Flux2Transformer2DModel`
folder, any size, with the config read from the shapes; and where each LoRA target lives in any of them.
"""

from __future__ import annotations

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.layout_checkpoint import LayoutTensor, SingleFileLayout, layout_tensors
from adapterzoo.formats.families.flux.checkpoint import bfl_norm_tensors
from adapterzoo.formats.families.flux.modules import FluxArchitecture
from adapterzoo.formats.families.flux2.modules import (
    BASE,
    CONFIGS,
    DEV,
    FLUX2_CLASS,
    architecture_from_table,
    module_table,
)
from adapterzoo.formats.families.flux2.probe import MARKERS, checkpoint_prefix, variant_of
from adapterzoo.formats.model.layouts import block_count

TITLE = "Flux.2"
HEAD_DIM = CONFIGS[DEV]["attention_head_dim"]
# (BFL name, diffusers name) of the tensors whose shapes give the config
_NAMES = {"embed": ("img_in.weight", "x_embedder.weight"), "context": ("txt_in.weight", "context_embedder.weight"),
          "time": ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
          "guidance": ("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"),
          "norm": ("double_blocks.0.img_attn.norm.query_norm.scale", "transformer_blocks.0.attn.norm_q.weight"),
          "mlp": ("double_blocks.0.img_mlp.0.weight", "transformer_blocks.0.ff.linear_in.weight"),
          "final": ("final_layer.linear.weight", "proj_out.weight"),
          "double": ("double_blocks.", "transformer_blocks."), "single": ("single_blocks.", "single_transformer_blocks.")}


def axes_dims_rope(head_dim: int) -> list[int]:
    """Flux.2's four rope axes of 32 for head dim 128; otherwise four even quarters (no weight records them)."""
    if head_dim % 8:
        raise BadFileError(f"attention head dim {head_dim} cannot be split into Flux.2's four even rope axes")
    return [head_dim // 4] * 4


def config_from_shapes(bare: dict[str, tuple[int, ...]]) -> dict:
    """The Flux2Transformer2DModel config of a transformer whose tensors (BFL or diffusers names, no prefix) have
    these shapes."""
    column = 0 if MARKERS[0] in bare else 1
    names = {key: pair[column] for key, pair in _NAMES.items()}
    try:
        hidden, in_channels = bare[names["embed"]]
        head = bare[names["norm"]][0]
        config = {**CONFIGS[DEV], "in_channels": in_channels, "num_layers": block_count(bare, names["double"]),
                  "num_single_layers": block_count(bare, names["single"]), "attention_head_dim": head,
                  "num_attention_heads": hidden // head, "joint_attention_dim": bare[names["context"]][1],
                  "timestep_guidance_channels": bare[names["time"]][1],
                  "mlp_ratio": bare[names["mlp"]][0] / (2 * hidden), "axes_dims_rope": axes_dims_rope(head),
                  "guidance_embeds": names["guidance"] in bare}
        out_channels = bare[names["final"]][0]
    except KeyError as missing:
        raise BadFileError(f"not a whole Flux.2 transformer: no {missing.args[0]}") from None
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    return config


def bfl_tensors(config: dict) -> list[LayoutTensor]:
    """Every tensor of the BFL single file of a Flux2Transformer2DModel with this config."""
    architecture = architecture_from_table(module_table(config))
    return layout_tensors(architecture.bfl, ("weight",)) + bfl_norm_tensors(config)  # norms named as in Flux.1


def _tensors(config: dict, shapes: dict, layout_names: bool) -> list[LayoutTensor]:
    return bfl_tensors(config)


def _architecture(config: dict) -> FluxArchitecture:
    variant = variant_of(config["num_attention_heads"] * config["attention_head_dim"], config["num_layers"] - 1,
                         config["num_single_layers"] - 1)
    return architecture_from_table(module_table(config), variant)


def _warnings(config: dict) -> list[str]:
    if config["attention_head_dim"] == HEAD_DIM:
        return []
    said = (f"head dim {config['attention_head_dim']}: rope axes set to {config['axes_dims_rope']} (the weights do "
            "not record them); edit config.json if the model was trained with others")
    return [said]


LAYOUT = SingleFileLayout(BASE, TITLE, FLUX2_CLASS, MARKERS[0], checkpoint_prefix, config_from_shapes, _tensors,
                          lambda architecture: architecture.bfl, _architecture, warnings=_warnings)
