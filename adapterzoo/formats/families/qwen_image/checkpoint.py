"""Qwen-Image transformer checkpoints (`LAYOUT`): ComfyUI's diffusion_models file (diffusers' own names, bare or
under `model.diffusion_model.`) <-> a diffusers `QwenImageTransformer2DModel` folder, any size, config from shapes;
and where each LoRA target lives in either. The names are the same on both sides, so only the config is inferred.
"""

from __future__ import annotations

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.layout_checkpoint import LayoutTensor, SingleFileLayout, renamed
from adapterzoo.formats.families.qwen_image.modules import (
    BASE,
    CONFIG,
    QWEN_CLASS,
    architecture_from_table,
    module_table,
)
from adapterzoo.formats.families.qwen_image.probe import ADDITION_T, checkpoint_prefix
from adapterzoo.formats.model.layouts import block_count

TITLE = "Qwen-Image"
NO_LAYOUT = "\0"  # no key spells a Qwen-Image file in a layout of its own: its names are diffusers'
HEAD_DIM = CONFIG["attention_head_dim"]


def axes_dims_rope(head: int) -> list[int]:
    """Qwen-Image's rope axes (16, 56, 56) for head dim 128; otherwise the same proportions, even, summing to it."""
    if head == HEAD_DIM:
        return list(CONFIG["axes_dims_rope"])
    first = 2 * round(head / 16)
    if (head - first) % 4:
        raise BadFileError(f"attention head dim {head} cannot be split into Qwen-Image's three even rope axes")
    return [first, (head - first) // 2, (head - first) // 2]


def config_from_shapes(bare: dict[str, tuple[int, ...]]) -> dict:
    """The QwenImageTransformer2DModel config of a transformer whose tensors (no prefix) have these shapes. The
    patch size is not in the weights: Qwen-Image's 2 is assumed (proj_out's rows are 2 x 2 x out_channels)."""
    patch = CONFIG["patch_size"]
    try:
        hidden, in_channels = bare["img_in.weight"]
        head = bare["transformer_blocks.0.attn.norm_q.weight"][0]
        config = {**CONFIG, "in_channels": in_channels, "out_channels": bare["proj_out.weight"][0] // patch ** 2,
                  "num_layers": block_count(bare, "transformer_blocks."), "attention_head_dim": head,
                  "num_attention_heads": hidden // head, "joint_attention_dim": bare["txt_in.weight"][1],
                  "axes_dims_rope": axes_dims_rope(head)}
    except KeyError as missing:
        raise BadFileError(f"not a whole Qwen-Image transformer: no {missing.args[0]}") from None
    if ADDITION_T in bare:
        config["use_additional_t_cond"] = True
    return config


def _tensors(config: dict, shapes: dict[str, tuple[int, ...]], layout_names: bool) -> list[LayoutTensor]:
    """Every tensor under its own name: the single file is the folder's weights, renamed by nothing."""
    return [renamed(name, name, shape[0] if shape else 1) for name, shape in shapes.items()]


def _warnings(config: dict) -> list[str]:
    if config["attention_head_dim"] == HEAD_DIM:
        return []
    return [f"head dim {config['attention_head_dim']}: rope axes set to {config['axes_dims_rope']} (the weights do not "
            "record them); edit config.json if the model was trained with others"]


LAYOUT = SingleFileLayout(BASE, TITLE, QWEN_CLASS, NO_LAYOUT, checkpoint_prefix, config_from_shapes, _tensors,
                          lambda architecture: (), lambda config: architecture_from_table(module_table(config)),
                          warnings=_warnings)
