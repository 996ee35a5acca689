"""Probe full checkpoints and their parts (UNet, VAE, ControlNet, DiT) by key families (FORMATS.md §5)."""

from __future__ import annotations

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable

CONTEXT_BASE = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl"}
IN_CHANNEL_VARIANT = {9: "inpaint", 8: "instruct-pix2pix"}
FLUX_IN_CHANNEL_VARIANT = {384: "fill", 128: "depth"}  # packed img_in widths with guidance (FLUX.md §1.4; Canny = Depth)
TEXT_ENCODER_FAMILIES = {
    "cond_stage_model.transformer.": ("text_encoder", "sd1"),
    "cond_stage_model.model.": ("text_encoder", "sd2"),
    "conditioner.embedders.0.transformer.": ("text_encoder", "sdxl"),
    "conditioner.embedders.1.model.": ("text_encoder_2", "sdxl"),
    "conditioner.embedders.0.model.": ("text_encoder_2", "sdxl"),
}


def _has(keys: list[str], fragment: str) -> bool:
    return any(fragment in k for k in keys)


def _dit_base(table: TensorTable) -> tuple[str, dict] | None:
    keys = list(table)
    if _has(keys, "joint_blocks.") or (_has(keys, "attn.add_q_proj") and _has(keys, "pos_embed.proj")):
        return "sd3", {}
    if _has(keys, "double_blocks.") or _has(keys, "single_transformer_blocks."):
        if not (_has(keys, "guidance_in.") or _has(keys, "guidance_embedder.")):
            return "flux", {"variant": "schnell"}  # no guidance embedder: the one difference in shapes
        in_channels = next((m.shape[1] for k, m in table.items()
                            if k.endswith(("img_in.weight", "x_embedder.weight")) and len(m.shape) == 2), None)
        return "flux", {"variant": FLUX_IN_CHANNEL_VARIANT.get(in_channels, "dev")}
    return None


def _unet_naming(keys: list[str]) -> str | None:
    if any(k.startswith(("model.diffusion_model.input_blocks.", "input_blocks.")) for k in keys):
        return "ldm"
    if any(k.startswith("conv_in.") for k in keys) and _has(keys, "down_blocks."):
        return "diffusers"
    return None


def _is_vae(keys: list[str]) -> bool:
    stripped = [k.removeprefix("first_stage_model.").removeprefix("vae.") for k in keys]
    return any(k.startswith("encoder.conv_in.") for k in stripped) and any(
        k.startswith("decoder.conv_out.") for k in stripped
    )


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """Fill `result` if the tensors are a checkpoint, a checkpoint part, a VAE or a ControlNet."""
    keys = list(table)
    dit = _dit_base(table)
    naming = _unet_naming(keys)
    if dit:
        result.kind, result.base = "checkpoint", dit[0]
        result.format = "diffusers" if _has(keys, "transformer_blocks.") and not _has(keys, "double_blocks.") else "ldm"
        result.details.update(dit[1])
        result.details["components"] = ["transformer" if c == "unet" else c for c in _components(keys)]
        return True
    controlnet = any(k.startswith(("control_model.", "controlnet_cond_embedding.", "input_hint_block.")) for k in keys)
    if naming is None and not controlnet:
        if _is_vae(keys):
            result.kind, result.format = "vae", "ldm" if _has(keys, "encoder.down.0.") else "diffusers"
            z = next((m.shape[0] for k, m in table.items() if k.endswith("quant_conv.weight")
                      and not k.endswith("post_quant_conv.weight")), None)
            if z is not None:
                result.details["latent_channels"] = z // 2
                result.base = "sd3" if z // 2 == 16 else "unknown"
            return True
        return False

    result.kind = "controlnet" if controlnet else "checkpoint"
    result.format = naming or "ldm"
    result.details["components"] = _components(keys)
    context = [m.shape[1] for k, m in table.items() if k.endswith("attn2.to_k.weight") and len(m.shape) == 2]
    te_bases = [base for prefix, (_, base) in TEXT_ENCODER_FAMILIES.items() if any(k.startswith(prefix) for k in keys)]
    if context:
        width = max(context)
        result.base = CONTEXT_BASE.get(width, "unknown")
        result.details["context_dim"] = width
        if width == 1280:
            result.details["variant"] = "refiner"
    elif te_bases:
        result.base = max(te_bases, key=("sd1", "sd2", "sdxl").index)
    if _has(keys, "label_emb.") or _has(keys, "add_embedding."):
        result.base = "sdxl"
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "input_blocks.0.0.weight", "conv_in.weight"):
        if key in table and len(table[key].shape) == 4:
            in_channels = table[key].shape[1]
            result.details["in_channels"] = in_channels
            if in_channels in IN_CHANNEL_VARIANT:
                result.details["variant"] = IN_CHANNEL_VARIANT[in_channels]
            break
    if sum(k.startswith("model_ema.") for k in keys) > 100:
        result.details["ema"] = True
    for key, meta in table.items():
        if key.endswith("embeddings.position_ids") and not meta.dtype.startswith("I"):
            result.warnings.append(f"{key} is stored as {meta.dtype}, not int64: a broken CLIP from a bad merge")
    return True


def _components(keys: list[str]) -> list[str]:
    found = []
    if any(k.startswith(("model.diffusion_model.", "input_blocks.", "conv_in.", "double_blocks.", "joint_blocks."))
           for k in keys):
        found.append("unet")
    if any(k.startswith("first_stage_model.") for k in keys):
        found.append("vae")
    for prefix, (component, _) in TEXT_ENCODER_FAMILIES.items():
        if any(k.startswith(prefix) for k in keys) and component not in found:
            found.append(component)
    if any(k.startswith("text_encoders.") for k in keys):
        found.append("text_encoders")
    return found
