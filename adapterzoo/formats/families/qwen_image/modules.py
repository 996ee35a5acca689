"""Qwen-Image's LoRA targets: the diffusers `QwenImageTransformer2DModel` modules.

ComfyUI's Qwen-Image model (comfy/ldm/qwen_image) names every module as diffusers does, so its single files
and `diffusion_model.` LoRAs need no layout of their own: no fused or renamed Linears. The module table is
written out from the config in plain Python (a test holds it equal to diffusers' own on the meta device).
"""

from __future__ import annotations

import functools

from adapterzoo.formats.lora.spellings import spelled_transformer
from adapterzoo.formats.model.module_tables import ModuleTable
from adapterzoo.formats.model.targets import TRANSFORMER, Architecture, KohyaConvention

BASE = "qwen_image"
QWEN_CLASS = "QwenImageTransformer2DModel"
TIME_CHANNELS = 256  # the sinusoidal timestep projection's width
# Qwen/Qwen-Image transformer/config.json (Qwen-Image-Edit and -2509 share it; Edit-2511 adds zero_cond_t, Layered
# use_additional_t_cond and use_layer3d_rope, neither changing a Linear)
CONFIG = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
          "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
          "axes_dims_rope": [16, 56, 56]}
CONVENTION = KohyaConvention({TRANSFORMER: ("lora_unet", "lora_transformer")}, "diffusers")  # musubi-tuner's


def module_table(config: dict) -> ModuleTable:
    """(module path, weight shape) of every module of a QwenImageTransformer2DModel with this config, in its order."""
    h, head = config["num_attention_heads"] * config["attention_head_dim"], config["attention_head_dim"]
    joint, out = config["joint_attention_dim"], config["patch_size"] ** 2 * (config.get("out_channels")
                                                                               or config["in_channels"])
    rows: list[tuple[str, tuple[int, ...]]] = [("time_text_embed.timestep_embedder.linear_1", (h, TIME_CHANNELS)),
                                               ("time_text_embed.timestep_embedder.linear_2", (h, h))]
    if config.get("use_additional_t_cond"):
        rows.append(("time_text_embed.addition_t_embedding", (2, h)))
    rows += [("txt_norm", (joint,)), ("img_in", (h, config["in_channels"])), ("txt_in", (h, joint))]
    square = (h, h)
    for n in range(config["num_layers"]):
        b, a = f"transformer_blocks.{n}", f"transformer_blocks.{n}.attn"
        rows += [(f"{b}.img_mod.1", (6 * h, h)), (f"{a}.norm_q", (head,)), (f"{a}.norm_k", (head,)),
                 (f"{a}.to_q", square), (f"{a}.to_k", square), (f"{a}.to_v", square), (f"{a}.add_k_proj", square),
                 (f"{a}.add_v_proj", square), (f"{a}.add_q_proj", square), (f"{a}.to_out.0", square),
                 (f"{a}.to_add_out", square), (f"{a}.norm_added_q", (head,)), (f"{a}.norm_added_k", (head,)),
                 (f"{b}.img_mlp.net.0.proj", (4 * h, h)), (f"{b}.img_mlp.net.2", (h, 4 * h)),
                 (f"{b}.txt_mod.1", (6 * h, h)), (f"{b}.txt_mlp.net.0.proj", (4 * h, h)),
                 (f"{b}.txt_mlp.net.2", (h, 4 * h))]
    rows += [("norm_out.linear", (2 * h, h)), ("proj_out", (out, h))]
    return ModuleTable(tuple(rows), {})


def architecture_from_table(table: ModuleTable) -> Architecture:
    """The targets of a Qwen-Image transformer with this module table, spelled every way its trainers write them."""
    targets, spellings, _ = spelled_transformer(table, lambda targets: [])
    return Architecture(BASE, targets, spellings.aliases, CONVENTION, spellings.fused)


@functools.cache
def builtin_architecture() -> Architecture:
    """Qwen-Image (and its Edit models, the same shapes) at its real size."""
    return architecture_from_table(module_table(CONFIG))
