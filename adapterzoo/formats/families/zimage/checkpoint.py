"""Z-Image transformer checkpoints (`LAYOUT`): ComfyUI's single file (diffusion_models, with or without a prefix) or a file
of diffusers-named tensors <-> a diffusers `ZImageTransformer2DModel` folder, any size, config from shapes; and
where each LoRA target lives in any of them. Reference: diffusers' `convert_z_image_transformer_checkpoint_to_diffusers`.

ComfyUI's file stores the tensors diffusers stores, named alike but for the fused attention.qkv, attention.out,
the q/k norms, x_embedder and final_layer, plus a `norm_final.weight` that neither model uses: it is left out
of the folder, and a single file written from a folder has none (ComfyUI loads it without).
"""

from __future__ import annotations

from adapterzoo.errors import BadFileError
from adapterzoo.formats.checkpoint.layout_checkpoint import LayoutTensor, SingleFileLayout, layout_tensors, renamed
from adapterzoo.formats.families.zimage.modules import (
    BASE,
    CONFIG,
    ZIMAGE_CLASS,
    ZImageArchitecture,
    architecture_from_table,
    module_table,
)
from adapterzoo.formats.families.zimage.probe import COMFY_MARKER, checkpoint_prefix
from adapterzoo.formats.model.layouts import block_count

TITLE = "Z-Image"
UNUSED = "norm_final.weight"  # in ComfyUI's files, in neither model's forward
_NORMS = {"q_norm": "norm_q", "k_norm": "norm_k"}  # ComfyUI -> diffusers, under <block>.N.attention.
HEAD_DIM = 128


def axes_dims(head: int) -> list[int]:
    """Z-Image's rope axes (32, 48, 48) for head dim 128; otherwise the same proportions, even, summing to it."""
    if head == HEAD_DIM:
        return list(CONFIG["axes_dims"])
    first = 2 * round(head / 8)
    rest = head - first
    if rest % 4:
        raise BadFileError(f"attention head dim {head} cannot be split into Z-Image's three even rope axes")
    return [first, rest // 2, rest // 2]


def config_from_shapes(bare: dict[str, tuple[int, ...]]) -> dict:
    """The ZImageTransformer2DModel config of a transformer whose tensors (ComfyUI or diffusers names, no prefix)
    have these shapes. ComfyUI's files have one patch size, 2 (ComfyUI's own Z-Image)."""
    comfy = COMFY_MARKER in bare
    try:
        dim, cap = bare["cap_embedder.1.weight"]
        head = bare["layers.0.attention." + ("q_norm" if comfy else "norm_q") + ".weight"][0]
        heads = dim // head
        kv_rows = bare[COMFY_MARKER][0] - dim if comfy else 2 * bare["layers.0.attention.to_k.weight"][0]
        if comfy:
            patches = [("2", "1", bare["x_embedder.weight"][1])]
        else:
            patches = [(*k.split(".")[1].split("-"), v[1]) for k, v in bare.items()
                       if k.startswith("all_x_embedder.") and k.endswith(".weight")]
        p, f, width = patches[0]
        config = {**CONFIG, "dim": dim, "cap_feat_dim": cap, "n_heads": heads, "n_kv_heads": kv_rows // 2 // head,
                  "n_layers": block_count(bare, "layers."), "n_refiner_layers": block_count(bare, "noise_refiner."),
                  "in_channels": width // (int(p) ** 2 * int(f)), "all_patch_size": [int(x[0]) for x in patches],
                  "all_f_patch_size": [int(x[1]) for x in patches], "axes_dims": axes_dims(head),
                  "siglip_feat_dim": bare["siglip_embedder.1.weight"][1] if "siglip_embedder.1.weight" in bare else None}
    except KeyError as missing:
        raise BadFileError(f"not a whole Z-Image transformer: no {missing.args[0]}") from None
    return config


def _comfy_norms(architecture: ZImageArchitecture, head: int) -> list[LayoutTensor]:
    out = []
    for module in architecture.comfy:
        if module.name.endswith(".attention.qkv"):
            block = module.name.removesuffix(".qkv")
            out += [renamed(f"{block}.{comfy}.weight", f"{block}.{ours}.weight", head) for comfy, ours in _NORMS.items()]
    return out


def comfy_tensors(config: dict, shapes: dict[str, tuple[int, ...]], comfy_names: bool) -> list[LayoutTensor]:
    """The ComfyUI file's tensors of a model with this config: the layout's, its renamed norms, and every other
    tensor of `shapes` (the source's, bare; in ComfyUI's names if `comfy_names`) under its own name."""
    architecture = architecture_from_table(module_table(config))
    tensors = layout_tensors(architecture.comfy) + _comfy_norms(architecture, config["dim"] // config["n_heads"])
    covered = {t.name for t in tensors} if comfy_names else {part for t in tensors for part, _ in t.parts}
    return tensors + [renamed(name, name, shape[0] if shape else 1) for name, shape in shapes.items()
                      if name not in covered and name != UNUSED]


LAYOUT = SingleFileLayout(BASE, TITLE, ZIMAGE_CLASS, COMFY_MARKER, checkpoint_prefix, config_from_shapes,
                          comfy_tensors, lambda architecture: architecture.comfy,
                          lambda config: architecture_from_table(module_table(config)),
                          lambda config: {**CONFIG, **config})
