"""Z-Image's LoRA targets: the diffusers `ZImageTransformer2DModel` modules, and the names of ComfyUI's layout.

ComfyUI (and the original Tongyi code) fuse each block's q, k, v into `attention.qkv` and name a few modules
otherwise (`attention.out`, `x_embedder`, `final_layer`); the rest share diffusers' names. The module table is
written out from the config in plain Python (a test holds it equal to diffusers' own on the meta device).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from adapterzoo.formats.lora.spellings import spelled_transformer
from adapterzoo.formats.model.layouts import LayoutBuilder
from adapterzoo.formats.model.module_tables import ModuleTable
from adapterzoo.formats.model.targets import TRANSFORMER, Architecture, FusedModule, KohyaConvention, Target

BASE = "zimage"
ZIMAGE_CLASS = "ZImageTransformer2DModel"
BLOCKS = ("noise_refiner", "context_refiner", "layers")  # diffusers and ComfyUI name them alike
ADALN_EMBED_DIM = 256  # diffusers' ADALN_EMBED_DIM: the timestep embedding's width is min(dim, 256)
TIME_MID = 1024  # the timestep embedder's hidden width
# Tongyi-MAI/Z-Image-Turbo and Tongyi-MAI/Z-Image transformer/config.json: the same config (one architecture)
CONFIG = {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
          "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
          "cap_feat_dim": 2560, "siglip_feat_dim": None, "rope_theta": 256.0, "t_scale": 1000.0,
          "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512]}
CONVENTION = KohyaConvention({TRANSFORMER: ("lora_unet", "lora_transformer")}, "diffusers")  # musubi-tuner's


@dataclass(frozen=True)
class ZImageArchitecture(Architecture):
    """Z-Image targets plus ComfyUI's Linears in its order (each a target renamed or the fused attention.qkv)."""

    comfy: tuple[FusedModule, ...] = ()


def patch_keys(config: dict) -> list[str]:
    """`2-1`: the keys of the patch-size embedders and final layers, in the model's order."""
    return [f"{p}-{f}" for p, f in zip(config["all_patch_size"], config["all_f_patch_size"])]


def _block(prefix: str, config: dict, modulation: bool) -> list[tuple[str, tuple[int, ...]]]:
    dim, heads = config["dim"], config["n_heads"]
    head, ffn, square = dim // heads, int(dim / 3 * 8), (dim, dim)
    rows = [(f"{prefix}.attention.norm_q", (head,)), (f"{prefix}.attention.norm_k", (head,)),
            (f"{prefix}.attention.to_q", square), (f"{prefix}.attention.to_k", square),
            (f"{prefix}.attention.to_v", square), (f"{prefix}.attention.to_out.0", square),
            (f"{prefix}.feed_forward.w1", (ffn, dim)), (f"{prefix}.feed_forward.w2", (dim, ffn)),
            (f"{prefix}.feed_forward.w3", (ffn, dim))]
    rows += [(f"{prefix}.{norm}", (dim,)) for norm in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2")]
    if modulation:
        rows.append((f"{prefix}.adaLN_modulation.0", (4 * dim, min(dim, ADALN_EMBED_DIM))))
    return rows


def module_table(config: dict) -> ModuleTable:
    """(module path, weight shape) of every module of a ZImageTransformer2DModel with this config, in its order."""
    dim, channels, embed = config["dim"], config["in_channels"], min(config["dim"], ADALN_EMBED_DIM)
    pairs = list(zip(patch_keys(config), config["all_patch_size"], config["all_f_patch_size"]))
    rows: list[tuple[str, tuple[int, ...]]] = [(f"all_x_embedder.{key}", (dim, f * p * p * channels))
                                               for key, p, f in pairs]
    for key, p, f in pairs:
        rows += [(f"all_final_layer.{key}.linear", (p * p * f * channels, dim)),
                 (f"all_final_layer.{key}.adaLN_modulation.1", (dim, embed))]
    for n in range(config["n_refiner_layers"]):
        rows += _block(f"noise_refiner.{n}", config, True)
    for n in range(config["n_refiner_layers"]):
        rows += _block(f"context_refiner.{n}", config, False)
    rows += [("t_embedder.mlp.0", (TIME_MID, 256)), ("t_embedder.mlp.2", (embed, TIME_MID)),
             ("cap_embedder.0", (config["cap_feat_dim"],)), ("cap_embedder.1", (dim, config["cap_feat_dim"]))]
    if config.get("siglip_feat_dim"):
        rows += [("siglip_embedder.0", (config["siglip_feat_dim"],)), ("siglip_embedder.1", (dim, config["siglip_feat_dim"]))]
        for n in range(config["n_refiner_layers"]):
            rows += _block(f"siglip_refiner.{n}", config, False)
    for n in range(config["n_layers"]):
        rows += _block(f"layers.{n}", config, True)
    return ModuleTable(tuple(rows), {})


def comfy_modules(targets: dict[str, Target]) -> list[FusedModule]:
    """ComfyUI's Linears that are not diffusers' own: the fused qkv, `attention.out`, the embedder and final layer
    of the first patch size (ComfyUI's model has one)."""
    layout = LayoutBuilder(targets)
    add = layout.add
    first = next((p.split(".")[2] for p in targets if p.startswith(f"{TRANSFORMER}.all_x_embedder.")), None)
    add("x_embedder", f"all_x_embedder.{first}")
    add("final_layer.linear", f"all_final_layer.{first}.linear")
    add("final_layer.adaLN_modulation.1", f"all_final_layer.{first}.adaLN_modulation.1")
    for blocks in ("noise_refiner", "context_refiner", "siglip_refiner", "layers"):
        for n in layout.blocks(blocks):
            a = f"{blocks}.{n}.attention"
            add(f"{a}.qkv", f"{a}.to_q", f"{a}.to_k", f"{a}.to_v")
            add(f"{a}.out", f"{a}.to_out.0")
    return layout.modules


def architecture_from_table(table: ModuleTable) -> ZImageArchitecture:
    """The targets of a Z-Image transformer with this module table, spelled every way its trainers write them."""
    targets, spellings, comfy = spelled_transformer(table, comfy_modules)
    return ZImageArchitecture(BASE, targets, spellings.aliases, CONVENTION, spellings.fused, comfy=comfy)


@functools.cache
def builtin_architecture() -> ZImageArchitecture:
    """Z-Image (Turbo and Base share it) at its real size."""
    return architecture_from_table(module_table(CONFIG))
