"""Which model parts a single file holds, from where its keys live (FORMATS.md §5)."""

from __future__ import annotations

# Where LDM/SGM single files keep their text encoders, and the diffusers component each one is.
LDM_TEXT_ENCODER_ROOTS = {
    "cond_stage_model.transformer.": "text_encoder",
    "cond_stage_model.model.": "text_encoder",
    "conditioner.embedders.0.transformer.": "text_encoder",
    "conditioner.embedders.1.model.": "text_encoder_2",
    "conditioner.embedders.0.model.": "text_encoder_2",
}
VAE_ROOTS = ("first_stage_model.", "vae.")  # LDM/SGM and SAI files; ComfyUI's full Flux.1 checkpoints
TEXT_ENCODERS_ROOT = "text_encoders."  # ComfyUI's full checkpoints of transformer models: one name per encoder


def single_file_components(keys: list[str], denoiser: str, roots: tuple[str, ...]) -> list[str]:
    """The parts present: the denoiser (named `denoiser`, found under any of `roots`), vae, text encoders (those
    under `text_encoders.` by the name the file gives each: clip_l, clip_g, t5xxl)."""
    found = []
    if any(k.startswith(roots) for k in keys):
        found.append(denoiser)
    if any(k.startswith(VAE_ROOTS) for k in keys):
        found.append("vae")
    for prefix, component in LDM_TEXT_ENCODER_ROOTS.items():
        if any(k.startswith(prefix) for k in keys) and component not in found:
            found.append(component)
    found.extend(dict.fromkeys(k.split(".")[1] for k in keys if k.startswith(TEXT_ENCODERS_ROOT)))
    return found
