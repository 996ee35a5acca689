"""Write the real-size key lists (names and shapes, no values) of HunyuanVideo, LTX-2, HiDream and Lumina 2
checkpoints that tests/test_dit_families.py probes: tests/fixtures/<family>_keys/*.json.gz, `{key: shape}`.

Each diffusers list is the state dict of diffusers' model class built on the meta device from the release's
published transformer config. Each single-file list (the names the original code, ComfyUI and city96's GGUFs
use) is written from that code's module names and proven here: diffusers' own single-file converter
(`diffusers.loaders.single_file_utils`) must turn it into exactly the diffusers list. Run it after a diffusers
upgrade; nothing is downloaded.

    python tools/write_family_key_lists.py
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import diffusers
import torch
from diffusers.loaders import single_file_utils as sfu

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
Shapes = dict[str, tuple[int, ...]]

HUNYUAN_T2V = {}  # diffusers' HunyuanVideoTransformer3DModel defaults are hunyuanvideo-community/HunyuanVideo's
HUNYUAN_I2V = {"in_channels": 33, "guidance_embeds": False, "image_condition_type": "latent_concat"}
HUNYUAN_15 = {}  # HunyuanVideo15Transformer3DModel defaults: the 1.5 release (8.3B, 54 blocks, 2048 wide)
LTX2 = {}  # LTX2VideoTransformer3DModel defaults: Lightricks/LTX-2 (19B), with its caption projection (2.0)
HIDREAM = {"patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 16, "num_single_layers": 32,
           "attention_head_dim": 128, "num_attention_heads": 20, "caption_channels": [4096, 4096],
           "text_emb_dim": 2048, "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32],
           "llama_layers": list(range(32))}  # HiDream-ai/HiDream-I1-Full (Dev and Fast are the same shapes)
LUMINA2 = {"cap_feat_dim": 2304}  # Alpha-VLLM/Lumina-Image-2.0: the defaults with Gemma-2 2B captions


def diffusers_shapes(model_class: str, config: dict) -> Shapes:
    with torch.device("meta"):
        model = getattr(diffusers, model_class).from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def converted(convert, shapes: Shapes) -> Shapes:
    out = convert({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    return {k: tuple(v.shape) for k, v in out.items()}


def hunyuan_original(config: dict) -> Shapes:
    """Tencent's HunyuanVideo names (hyvideo/modules/models.py), as its single files and ComfyUI's hold them."""
    d = diffusers_shapes("HunyuanVideoTransformer3DModel", config)
    w = d["x_embedder.proj.weight"][0]
    out: Shapes = {}

    def linear(name: str, shape: tuple[int, ...]) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = shape, (shape[0],)

    linear("img_in.proj", d["x_embedder.proj.weight"])
    for orig, ours in (("time_in.mlp.0", "timestep_embedder.linear_1"), ("time_in.mlp.2", "timestep_embedder.linear_2"),
                       ("vector_in.in_layer", "text_embedder.linear_1"), ("vector_in.out_layer", "text_embedder.linear_2"),
                       ("guidance_in.mlp.0", "guidance_embedder.linear_1"),
                       ("guidance_in.mlp.2", "guidance_embedder.linear_2")):
        if f"time_text_embed.{ours}.weight" in d:
            linear(orig, d[f"time_text_embed.{ours}.weight"])
    c = "context_embedder."
    linear("txt_in.input_embedder", d[c + "proj_in.weight"])
    for orig, ours in (("t_embedder.mlp.0", "timestep_embedder.linear_1"), ("t_embedder.mlp.2", "timestep_embedder.linear_2"),
                       ("c_embedder.linear_1", "text_embedder.linear_1"), ("c_embedder.linear_2", "text_embedder.linear_2")):
        linear(f"txt_in.{orig}", d[f"{c}time_text_embed.{ours}.weight"])
    refiners = {k.split(".")[3] for k in d if k.startswith(c + "token_refiner.refiner_blocks.")}
    for n in sorted(refiners, key=int):
        r = f"txt_in.individual_token_refiner.blocks.{n}"
        out[f"{r}.norm1.weight"] = out[f"{r}.norm1.bias"] = out[f"{r}.norm2.weight"] = out[f"{r}.norm2.bias"] = (w,)
        linear(f"{r}.self_attn_qkv", (3 * w, w))
        linear(f"{r}.self_attn_proj", (w, w))
        linear(f"{r}.mlp.fc1", (4 * w, w))
        linear(f"{r}.mlp.fc2", (w, 4 * w))
        linear(f"{r}.adaLN_modulation.1", (2 * w, w))
    head = d["transformer_blocks.0.attn.norm_q.weight"]
    for n in range(config.get("num_layers", 20)):
        b = f"double_blocks.{n}"
        for stream in ("img", "txt"):
            linear(f"{b}.{stream}_mod.linear", (6 * w, w))
            linear(f"{b}.{stream}_attn_qkv", (3 * w, w))
            out[f"{b}.{stream}_attn_q_norm.weight"] = out[f"{b}.{stream}_attn_k_norm.weight"] = head
            linear(f"{b}.{stream}_attn_proj", (w, w))
            linear(f"{b}.{stream}_mlp.fc1", (4 * w, w))
            linear(f"{b}.{stream}_mlp.fc2", (w, 4 * w))
    for n in range(config.get("num_single_layers", 40)):
        s = f"single_blocks.{n}"
        linear(f"{s}.linear1", (7 * w, w))
        linear(f"{s}.linear2", (w, 5 * w))
        out[f"{s}.q_norm.weight"] = out[f"{s}.k_norm.weight"] = head
        linear(f"{s}.modulation.linear", (3 * w, w))
    linear("final_layer.linear", d["proj_out.weight"])
    linear("final_layer.adaLN_modulation.1", d["norm_out.linear.weight"])
    assert converted(sfu.convert_hunyuan_video_transformer_to_diffusers, out) == d
    return out


LTX2_RENAMES = (  # diffusers' names -> Lightricks', longest first (convert_ltx2_transformer_to_diffusers, reversed)
    ("av_cross_attn_video_scale_shift", "av_ca_video_scale_shift_adaln_single"),
    ("av_cross_attn_video_a2v_gate", "av_ca_a2v_gate_adaln_single"),
    ("av_cross_attn_audio_scale_shift", "av_ca_audio_scale_shift_adaln_single"),
    ("av_cross_attn_audio_v2a_gate", "av_ca_v2a_gate_adaln_single"),
    ("video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
    ("audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
    ("audio_proj_in", "audio_patchify_proj"), ("audio_time_embed.", "audio_adaln_single."),
    ("norm_q", "q_norm"), ("norm_k", "k_norm"),
)


def ltx2_original(d: Shapes) -> Shapes:
    out = {}
    for key, shape in d.items():
        name = key
        for ours, theirs in LTX2_RENAMES:
            name = name.replace(ours, theirs)
        if name.startswith("proj_in."):
            name = "patchify_proj." + name.removeprefix("proj_in.")
        if name.startswith("time_embed."):
            name = "adaln_single." + name.removeprefix("time_embed.")
        out[name] = shape
    assert converted(sfu.convert_ltx2_transformer_to_diffusers, out) == d
    return out


def lumina2_original(d: Shapes) -> Shapes:
    """Alpha-VLLM's names (q, k, v fused into attention.qkv; Lumina-Image-2.0's models/model.py)."""
    out: Shapes = {"norm_final.weight": (d["x_embedder.weight"][0],)}
    renames = (("time_caption_embed.caption_embedder", "cap_embedder"),
               ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
               ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
               ("norm_out.linear_1", "final_layer.adaLN_modulation.1"), ("norm_out.linear_2", "final_layer.linear"),
               (".attn.to_out.0", ".attention.out"), (".attn.norm_q", ".attention.q_norm"),
               (".attn.norm_k", ".attention.k_norm"), (".feed_forward.linear_", ".feed_forward.w"),
               (".norm1.linear", ".adaLN_modulation.1"), (".norm1.norm", ".attention_norm1"),
               (".norm1.weight", ".attention_norm1.weight"), (".norm2.weight", ".attention_norm2.weight"))
    for key, shape in d.items():
        if ".attn.to_k." in key or ".attn.to_v." in key:
            continue
        if ".attn.to_q." in key:
            stem = key.replace(".attn.to_q.", ".attention.qkv.")
            k, v = d[key.replace("to_q", "to_k")], d[key.replace("to_q", "to_v")]
            out[stem] = (shape[0] + k[0] + v[0], *shape[1:])
            continue
        name = key
        for ours, theirs in renames:
            name = name.replace(ours, theirs)
        out[name] = shape
    assert converted(sfu.convert_lumina2_to_diffusers, out) == d
    return out


def write(folder: str, name: str, shapes: Shapes) -> None:
    path = ROOT / folder / f"{name}.json.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(json.dumps({k: list(v) for k, v in shapes.items()}).encode(), mtime=0))
    print(f"wrote {path.relative_to(ROOT.parent.parent)} ({len(shapes)} keys)")


def main() -> None:
    write("hunyuan_video_keys", "hunyuan_video_t2v", hunyuan_original(HUNYUAN_T2V))
    write("hunyuan_video_keys", "hunyuan_video_i2v", hunyuan_original(HUNYUAN_I2V))
    write("hunyuan_video_keys", "hunyuan_video_t2v_diffusers", diffusers_shapes("HunyuanVideoTransformer3DModel",
                                                                                HUNYUAN_T2V))
    write("hunyuan_video_keys", "hunyuan_video_1_5_diffusers", diffusers_shapes("HunyuanVideo15Transformer3DModel",
                                                                                HUNYUAN_15))
    ltx2 = diffusers_shapes("LTX2VideoTransformer3DModel", LTX2)
    write("ltx2_keys", "ltx2_19b_diffusers", ltx2)
    write("ltx2_keys", "ltx2_19b", ltx2_original(ltx2))
    write("hidream_keys", "hidream_i1", diffusers_shapes("HiDreamImageTransformer2DModel", HIDREAM))
    lumina = diffusers_shapes("Lumina2Transformer2DModel", LUMINA2)
    write("lumina2_keys", "lumina2_diffusers", lumina)
    write("lumina2_keys", "lumina2", lumina2_original(lumina))


if __name__ == "__main__":
    main()
