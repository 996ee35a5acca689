"""Which pipeline part a lone file holds, from its tensor names and shapes: the text encoders and VAE that
users of transformer-only checkpoints keep beside them (ComfyUI's `clip_l.safetensors` and `clip_g.safetensors`
in transformers' CLIPTextModel names with `text_projection.weight` beside `text_model.`, `t5xxl_fp16.safetensors`
in T5EncoderModel's, `qwen_3_4b.safetensors` in Qwen3's under `model.`, BFL's `ae.safetensors` and SD3's VAE in
LDM names), and the config each one is built with (nothing fetched: every config is read from the shapes, but
for what no Qwen3 weight holds: its rope and norm constants, Qwen3-4B's). The same parts bundled in a single file
beside its denoiser (ComfyUI's full Flux.1 checkpoints, SAI's SD3 `*_incl_clips` files) are each found as a lone
part under its own root (`bundled_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from adapterzoo.formats.checkpoint.shape_reading import Shapes, clip_config_from_hf, count, need, vae_config_from_ldm

CLIP_PREFIXES = ("text_model.", "")  # ComfyUI and transformers <5 keep `text_model.`; transformers 5 does not
T5_PREFIXES = ("",)
QWEN3_PREFIXES = ("model.", "")  # Qwen3ForCausalLM's files (ComfyUI's) and Qwen3Model's
VAE_PREFIXES = ("first_stage_model.", "vae.", "")
T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
CLIP_MARK = "encoder.layers.0.self_attn.q_proj.weight"
QWEN3_MARK = "layers.0.self_attn.q_norm.weight"  # Qwen3's per-head q norm, which Qwen2's lacks
# Qwen3-4B's config.json (Z-Image's text encoder): what no weight's shape says
QWEN3_CONSTANTS = {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 40960}
PROJECTION = "text_projection.weight"  # a CLIP's pooled projection, at the file's root in every naming
LDM_VAE_MARK = "encoder.down.0.block.0.conv1.weight"
DIFFUSERS_VAE_MARK = "encoder.down_blocks.0.resnets.0.conv1.weight"


@dataclass(frozen=True)
class PartFile:
    """A lone part: what it is, the class it loads into, its width, and how its keys are spelled."""

    kind: str  # "text encoder" or "vae": which option takes it
    library: str  # "transformers" or "diffusers"
    model_class: str  # CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, AutoencoderKL
    width: int | None  # a text encoder's hidden width
    prefix: str  # stripped from every key before loading
    ldm: bool = False  # a VAE in LDM names (renamed on load)
    config: dict | None = None  # a text encoder's config; a VAE's from `vae_config` (its factors are the caller's)
    root: str = ""  # where the part lives in a bundling file (`text_encoders.clip_l.transformer.`); "" in a lone one

    def what(self) -> str:
        """How a message names it: 'a T5EncoderModel text encoder, 4096 wide'."""
        return f"a {self.model_class} {self.kind}" + (f", {self.width} wide" if self.width else "")


def _under(shapes: Shapes, prefix: str) -> Shapes:
    return {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}


def t5_config_from_shapes(shapes: Shapes) -> dict:
    """T5Config fields of an encoder's tensors: heads from the relative attention bias [buckets, heads]."""
    vocab, width = need(shapes, "shared.weight", "T5 encoder") if "shared.weight" in shapes else \
        need(shapes, "encoder.embed_tokens.weight", "T5 encoder")
    buckets, heads = need(shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "T5 encoder")
    inner = need(shapes, T5_MARK, "T5 encoder")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff = need(shapes, "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight", "T5 encoder")
    return {"vocab_size": vocab, "d_model": width, "d_kv": inner // heads, "num_heads": heads, "d_ff": ff[0],
            "num_layers": count(shapes, r"^encoder\.block\.(\d+)\."), "relative_attention_num_buckets": buckets,
            "feed_forward_proj": "gated-gelu" if gated else "relu", "is_encoder_decoder": False, "use_cache": False}


def qwen3_config_from_shapes(shapes: Shapes) -> dict:
    """Qwen3Config fields of a decoder's tensors (no prefix): heads from the q and k rows over the q norm's width."""
    vocab, width = need(shapes, "embed_tokens.weight", "Qwen3 text encoder")
    head = need(shapes, QWEN3_MARK, "Qwen3 text encoder")[0]
    return {**QWEN3_CONSTANTS, "vocab_size": vocab, "hidden_size": width, "head_dim": head,
            "num_attention_heads": need(shapes, "layers.0.self_attn.q_proj.weight", "Qwen3 text encoder")[0] // head,
            "num_key_value_heads": need(shapes, "layers.0.self_attn.k_proj.weight", "Qwen3 text encoder")[0] // head,
            "intermediate_size": need(shapes, "layers.0.mlp.gate_proj.weight", "Qwen3 text encoder")[0],
            "num_hidden_layers": count(shapes, r"^layers\.(\d+)\.")}


def vae_config(part: PartFile, shapes: Shapes, sample_size: int, factors: dict[str, float]) -> dict:
    """An LDM-named VAE's AutoencoderKL config, with the latent factors its family declares (no weight holds them)."""
    config = vae_config_from_ldm(_under(shapes, part.prefix), sample_size, factors.get("scaling_factor", 1.0))
    return {**config, **factors}


def recognise(shapes: Shapes) -> PartFile | None:
    """The part a lone file holds, or None when it is none of a CLIP, T5 or Qwen3 text encoder or a KL VAE."""
    for prefix in CLIP_PREFIXES:
        if prefix + CLIP_MARK in shapes and prefix + "embeddings.token_embedding.weight" in shapes:
            config = clip_config_from_hf(_under(shapes, prefix))
            if PROJECTION in shapes:  # ComfyUI's clip_g (and SD3's clip_l) keep it beside `text_model.`, not in it
                config["projection_dim"] = shapes[PROJECTION][0]
            projection = "projection_dim" in config
            return PartFile("text encoder", "transformers",
                            "CLIPTextModelWithProjection" if projection else "CLIPTextModel",
                            config["hidden_size"], prefix, config=config)
    for prefix in T5_PREFIXES:
        if prefix + T5_MARK in shapes:
            config = t5_config_from_shapes(_under(shapes, prefix))
            return PartFile("text encoder", "transformers", "T5EncoderModel", config["d_model"], prefix, config=config)
    for prefix in QWEN3_PREFIXES:
        if prefix + QWEN3_MARK in shapes and prefix + "embed_tokens.weight" in shapes:
            config = qwen3_config_from_shapes(_under(shapes, prefix))
            return PartFile("text encoder", "transformers", "Qwen3Model", config["hidden_size"], prefix, config=config)
    for prefix in VAE_PREFIXES:
        if prefix + LDM_VAE_MARK in shapes:
            return PartFile("vae", "diffusers", "AutoencoderKL", None, prefix, ldm=True)
        if prefix + DIFFUSERS_VAE_MARK in shapes:
            return PartFile("vae", "diffusers", "AutoencoderKL", None, prefix)
    return None


# each part's marking tensor -> the prefix its tower may keep below the part's root (a CLIP's projection is beside)
MARKS = {CLIP_MARK: "text_model.", T5_MARK: "", QWEN3_MARK: "model.", LDM_VAE_MARK: "", DIFFUSERS_VAE_MARK: ""}


def bundled_parts(shapes: Shapes) -> list[PartFile]:
    """The lone parts a single file holds under roots of their own (ComfyUI's `text_encoders.clip_l.transformer.`,
    `text_encoders.t5xxl.transformer.`, `vae.`; SAI's `first_stage_model.`), each as `recognise` reads it alone, its
    `prefix` and `root` the full key prefixes; a part at the file's root (a lone file) is not one."""
    roots = []
    for key in shapes:
        for mark, inner in MARKS.items():
            if key.endswith(mark):
                head = key[:-len(mark)]
                root = head[:-len(inner)] if inner and head.endswith(inner) else head
                if root and root not in roots:
                    roots.append(root)
    found = []
    for root in roots:
        part = recognise(_under(shapes, root))
        if part is not None:
            found.append(replace(part, prefix=root + part.prefix, root=root))
    return found
