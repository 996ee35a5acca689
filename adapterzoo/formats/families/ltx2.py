"""LTX-2: Lightricks' audio-video DiT (`LTX2VideoTransformer3DModel`): 48 blocks, each a 4096-wide video stream and
a 2048-wide audio stream with cross-attention between them. Recognised from a header; LoRAs are not read yet.

Lightricks' single files (and ComfyUI's, under `model.diffusion_model.`, with the video and audio VAEs beside)
name the blocks as diffusers does (`transformer_blocks.N.attn1.to_q`, `audio_attn1`, `audio_to_video_attn`) and
a few top-level modules otherwise (`patchify_proj`, `adaln_single`, `av_ca_*`). The releases differ in what they
hold: 2.0 projects captions in the transformer (`caption_projection`), 2.3 modulates cross-attention from the
timestep (a 9-way `adaln_single`), 2.5 has feed-forwards without bias and a keyframe embedding. A LoRA on the
video stream alone has the names and shapes of LTX-Video 13B's; it reads as LTX-2 with a warning.
"""

from __future__ import annotations

import re

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.lora.comfy_keys import comfy_dialect
from adapterzoo.formats.lora.lora_parts import module_dims
from adapterzoo.formats.model.block_names import bare, block_numbers, prefix_of
from adapterzoo.formats.model.family import Family

BASE = "ltx2"
WIDTH = 4096
MARKER = "transformer_blocks.0.audio_attn1.to_q.weight"  # both layouts name the blocks alike
# The audio stream and the two cross-modal attentions, in any dialect and layout: LTX-2's alone.
_AUDIO = re.compile(r"audio_(?:attn[12]|ff|to_video_attn|proj_in|patchify_proj|caption_projection|time_embed"
                    r"|adaln_single)|video_to_audio_attn|av_ca_|av_cross_attn")
_VIDEO = re.compile(r"^transformer_blocks[._]\d+[._](?:attn[12]|ff)[._]")
COMPONENTS = {"vae.": "vae", "audio_vae.": "audio_vae", "vocoder.": "vocoder"}


def _width(modules: dict[str, dict[str, str]], table: TensorTable) -> int | None:
    for name, parts in modules.items():
        if re.search(r"^transformer_blocks[._]\d+[._]attn1[._]to_q$", bare(name)) and (dims := module_dims(parts, table)):
            return dims[1]
    return None


def lora_base(modules: dict[str, dict[str, str]], table: TensorTable) -> str | None:
    """The audio stream's modules, or the video stream's (attn1, attn2, ff) at LTX-2's width."""
    names = [bare(n) for n in modules]
    if any(_AUDIO.search(n) for n in names):
        return BASE
    return BASE if any(_VIDEO.search(n) for n in names) and _width(modules, table) == WIDTH else None


def describe_lora(modules: dict[str, dict[str, str]], table: TensorTable, result: ProbeResult) -> None:
    names = [bare(n) for n in modules]
    audio = any(_AUDIO.search(n) for n in names)
    blocks = block_numbers(names, "transformer_blocks")
    result.details["coverage"] = {
        "transformer_blocks": blocks, "audio": audio, "text_encoders": [],
        "other_modules": sum(1 for n in names if not re.match(r"transformer_blocks[._]\d", n))}
    if not audio:
        result.warnings.append("it patches the video stream only, whose names and shapes LTX-Video 13B shares; "
                               "read as LTX-2")


def metadata_base(metadata: dict[str, str]) -> str | None:
    said = (metadata.get("ss_base_model_version", "") + metadata.get("modelspec.architecture", "")).lower()
    return BASE if re.search(r"ltx[-_ ]?2", said) else None


def _release(names: set[str], modulations: int | None) -> str | None:
    """2.5, 2.3 or 2.0 from the modules each added or dropped (diffusers' LTX2VideoTransformer3DModel options):
    `modulations` is how many per-channel parameters the timestep modulation makes (6, or 9 with 2.3's)."""
    if "keyframes_abs_pos_embedding" in names or "transformer_blocks.0.ff.net.0.proj.bias" not in names:
        return "2.5"
    if "caption_projection.linear_1.weight" in names:
        return "2.0"
    return "2.3" if modulations == 9 else None


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    prefix = prefix_of(table, MARKER)
    if prefix is None:
        return False
    names = {k[len(prefix):] for k in table if k.startswith(prefix)}
    width = table[f"{prefix}transformer_blocks.0.attn1.to_q.weight"].shape[1]
    result.kind, result.base = "checkpoint", BASE
    result.format = "diffusers" if "audio_proj_in.weight" in names else "ldm"
    result.details |= {"width": width, "blocks": len(block_numbers(list(names), "transformer_blocks"))}
    modulations = next((table[prefix + k].shape[0] // width for k in ("adaln_single.linear.weight",
                                                                        "time_embed.linear.weight")
                        if prefix + k in table), None)
    if (release := _release(names, modulations)) is not None:
        result.details["variant"] = release
    others = [component for root, component in COMPONENTS.items() if any(k.startswith(root) for k in table)]
    result.details["components"] = ["transformer", *others]
    return True


FAMILY = Family(
    name="ltx2",
    title="LTX-2",
    bases=(BASE,),
    order=7,  # its `diffusion_model.` LoRAs before Flux.1's catch-all BFL dialect; claims only its own names
    lora_base=lora_base,
    metadata_base=metadata_base,
    describe_lora=describe_lora,
    dialects=(comfy_dialect(re.compile(f"{_AUDIO.pattern}|{_VIDEO.pattern}")),),
    probe_checkpoint=probe_checkpoint,
    pipeline_base=lambda pipeline, config: BASE if pipeline.startswith("LTX2") else None,
    civitai_base_models={BASE: ("LTXV2",)},  # "LTXV" is LTX-Video 0.9, another model
    hub_hints=(("ltx-2", BASE),),
)
