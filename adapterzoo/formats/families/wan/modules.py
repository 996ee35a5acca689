"""Wan's LoRA targets: the diffusers `WanTransformer3DModel` modules, and the names Wan's own code gives them.

Wan-AI's original files, ComfyUI's diffusion_models files and the LoRAs of musubi-tuner and ComfyUI name the
modules as Wan's `WanModel` does (`blocks.0.self_attn.q`, `cross_attn.k_img`, `ffn.0`, `head.head`); diffusers
renames them (`blocks.0.attn1.to_q`, `attn2.add_k_proj`, `ffn.net.0.proj`, `proj_out`). Nothing is fused: every
original name is one diffusers module renamed (`RENAMES`, read both ways). The module table is written out from
the config in plain Python (a test holds it equal to diffusers' own on the meta device).
"""

from __future__ import annotations

import functools
import re

from adapterzoo.formats.lora.spellings import layout_spellings, spelled_transformer
from adapterzoo.formats.model.layouts import LayoutBuilder
from adapterzoo.formats.model.module_tables import ModuleTable
from adapterzoo.formats.model.targets import TRANSFORMER, Architecture, FusedModule, KohyaConvention, Target, flatten

BASE = "wan"
WAN_CLASS = "WanTransformer3DModel"
HEAD_DIM = 128  # every Wan release; the weights do not record the head count
# the published transformer/config.json values (Wan-AI/Wan2.1-T2V-14B-Diffusers, -T2V-1.3B-, -I2V-14B-480P-,
# -FLF2V-14B-720P-, Wan2.2-T2V-A14B-, -I2V-A14B-, -TI2V-5B-Diffusers)
COMMON = {"patch_size": [1, 2, 2], "attention_head_dim": HEAD_DIM, "text_dim": 4096, "freq_dim": 256,
          "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
          "in_channels": 16, "out_channels": 16, "image_dim": None, "added_kv_proj_dim": None,
          "pos_embed_seq_len": None}
_14B = {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40}
CONFIGS = {
    "14b": {**COMMON, **_14B},  # 2.1 T2V 14B; 2.2 T2V A14B's two experts
    "14b-i2v": {**COMMON, **_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},  # 2.1 I2V
    "14b-flf2v": {**COMMON, **_14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120,
                  "pos_embed_seq_len": 514},  # 2.1 FLF2V
    "14b-i2v-2.2": {**COMMON, **_14B, "in_channels": 36},  # 2.2 I2V A14B's two experts: no image encoder
    "1.3b": {**COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
    "5b": {**COMMON, "num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48,
           "out_channels": 48},  # 2.2 TI2V 5B
}
SIZES = {1536: "1.3b", 3072: "5b", 5120: "14b"}  # width -> size
CONVENTION = KohyaConvention({TRANSFORMER: ("lora_unet", "lora_transformer")}, "wan")  # musubi-tuner's, Wan names

# diffusers module (or parameter) -> Wan's name; `{n}` a block number
RENAMES = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("condition_embedder.image_embedder.pos_embed", "img_emb.emb_pos"),
    ("blocks.{n}.attn1.to_q", "blocks.{n}.self_attn.q"),
    ("blocks.{n}.attn1.to_k", "blocks.{n}.self_attn.k"),
    ("blocks.{n}.attn1.to_v", "blocks.{n}.self_attn.v"),
    ("blocks.{n}.attn1.to_out.0", "blocks.{n}.self_attn.o"),
    ("blocks.{n}.attn1.norm_q", "blocks.{n}.self_attn.norm_q"),
    ("blocks.{n}.attn1.norm_k", "blocks.{n}.self_attn.norm_k"),
    ("blocks.{n}.attn2.to_q", "blocks.{n}.cross_attn.q"),
    ("blocks.{n}.attn2.to_k", "blocks.{n}.cross_attn.k"),
    ("blocks.{n}.attn2.to_v", "blocks.{n}.cross_attn.v"),
    ("blocks.{n}.attn2.to_out.0", "blocks.{n}.cross_attn.o"),
    ("blocks.{n}.attn2.norm_q", "blocks.{n}.cross_attn.norm_q"),
    ("blocks.{n}.attn2.norm_k", "blocks.{n}.cross_attn.norm_k"),
    ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    ("blocks.{n}.attn2.norm_added_k", "blocks.{n}.cross_attn.norm_k_img"),
    ("blocks.{n}.norm2", "blocks.{n}.norm3"),  # the cross-attention norm; Wan's norm1/norm2 hold no weights
    ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
    ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
    ("proj_out", "head.head"),
    ("scale_shift_table", "head.modulation"),
)


def _rules(source: int) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for pair in RENAMES:
        pattern = re.escape(pair[source]).replace(r"\{n\}", r"(?P<n>\d+)")
        out.append((re.compile(rf"^{pattern}(?P<leaf>\.weight|\.bias|)$"), pair[1 - source]))
    return out


_TO_WAN, _TO_DIFFUSERS = _rules(0), _rules(1)


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, template in rules:
        if m := pattern.match(name):
            return template.replace("{n}", m.groupdict().get("n") or "") + m["leaf"]
    return name


def wan_name(name: str) -> str:
    """Wan's name of a diffusers module, parameter or tensor key (`blocks.0.attn1.to_q.weight` ->
    `blocks.0.self_attn.q.weight`); a name both spell alike (`patch_embedding`) as it is."""
    return _rename(name, _TO_WAN)


def diffusers_name(name: str) -> str:
    """diffusers' name of a Wan module, parameter or tensor key; the inverse of `wan_name`."""
    return _rename(name, _TO_DIFFUSERS)


def module_table(config: dict) -> ModuleTable:
    """(module path, weight shape) of every module of a WanTransformer3DModel with this config, in its order."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    patch, ffn = tuple(config["patch_size"]), config["ffn_dim"]
    out = (config.get("out_channels") or config["in_channels"]) * patch[0] * patch[1] * patch[2]
    e = "condition_embedder"
    rows: list[tuple[str, tuple[int, ...]]] = [
        ("patch_embedding", (h, config["in_channels"], *patch)),
        (f"{e}.time_embedder.linear_1", (h, config["freq_dim"])), (f"{e}.time_embedder.linear_2", (h, h)),
        (f"{e}.time_proj", (6 * h, h)),
        (f"{e}.text_embedder.linear_1", (h, config["text_dim"])), (f"{e}.text_embedder.linear_2", (h, h))]
    if (image := config.get("image_dim")) is not None:
        rows += [(f"{e}.image_embedder.norm1", (image,)), (f"{e}.image_embedder.ff.net.0.proj", (image, image)),
                 (f"{e}.image_embedder.ff.net.2", (h, image)), (f"{e}.image_embedder.norm2", (h,))]
    qk = config.get("qk_norm") == "rms_norm_across_heads"
    added = config.get("added_kv_proj_dim")
    for n in range(config["num_layers"]):
        for attn, cross in (("attn1", False), ("attn2", True)):
            a = f"blocks.{n}.{attn}"
            rows += [(f"{a}.to_q", (h, h)), (f"{a}.to_k", (h, h)), (f"{a}.to_v", (h, h)), (f"{a}.to_out.0", (h, h))]
            if qk:
                rows += [(f"{a}.norm_q", (h,)), (f"{a}.norm_k", (h,))]
            if cross and added is not None:
                rows += [(f"{a}.add_k_proj", (h, added)), (f"{a}.add_v_proj", (h, added))]
                if qk:
                    rows.append((f"{a}.norm_added_k", (h,)))
        if config.get("cross_attn_norm"):
            rows.append((f"blocks.{n}.norm2", (h,)))
        rows += [(f"blocks.{n}.ffn.net.0.proj", (ffn, h)), (f"blocks.{n}.ffn.net.2", (h, ffn))]
    rows.append(("proj_out", (out, h)))
    return ModuleTable(tuple(rows), {})


def original_modules(targets: dict[str, Target]) -> list[FusedModule]:
    """Wan's Linears and its patch embedding under Wan's names, each one diffusers target (1-D norms are spelled
    by `architecture_from_table`)."""
    layout = LayoutBuilder(targets)
    for path, target in targets.items():
        if len(target.shape) >= 2:
            layout.add(wan_name(target.module_path), target.module_path)
    return layout.modules


def architecture_from_table(table: ModuleTable, variant: str | None = None) -> Architecture:
    """The targets of a Wan transformer with this module table, spelled every way its trainers write them:
    diffusers' names (`transformer_spellings`) and Wan's (kohya/musubi's `lora_unet_`, LyCORIS's, ComfyUI's
    `diffusion_model.`, bare, and ComfyUI's `transformer.`/`lora_transformer_` with Wan's names)."""
    targets, spellings, _ = spelled_transformer(table, original_modules)
    for path, target in targets.items():
        wan = wan_name(target.module_path)
        names = [f"{TRANSFORMER}.{wan}", f"lora_transformer_{flatten(wan)}"]
        if len(target.shape) < 2:
            names += layout_spellings(wan)
        for name in names:
            spellings.alias(name, path)
    return Architecture(BASE, targets, spellings.aliases, CONVENTION, spellings.fused, variant)


def config_name(variant: str | None) -> str:
    """The config a probe's variant (`2.1-i2v-14b`, `5b`, `2.2-t2v-14b-high-noise`) is sized by; a 14B of no
    known task reads 2.1 I2V's, whose modules are a superset of every 14B LoRA's."""
    said = variant or ""
    if "1.3b" in said:
        return "1.3b"
    if "5b" in said:
        return "5b"
    if "flf2v" in said:
        return "14b-flf2v"
    if "2.2" in said and "i2v" in said:
        return "14b-i2v-2.2"
    if "t2v" in said:
        return "14b"
    return "14b-i2v"


@functools.cache
def builtin_architecture(variant: str | None = None) -> Architecture:
    """A Wan release at its real size, by the probe's variant."""
    return architecture_from_table(module_table(CONFIGS[config_name(variant)]), config_name(variant))
