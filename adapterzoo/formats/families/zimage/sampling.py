"""Z-Image as verify's loop renders it: the single-stream DiT behind a UNet's call, prompts through Qwen3.

What ZImagePipeline does, step by step: the prompt is wrapped in Qwen3's chat template (a user turn, then the
assistant's turn opened), padded to 512 tokens, and Qwen3's next-to-last hidden states of the real tokens are
the caption; the transformer takes a list of [C, 1, h, w] latents and the timestep reversed onto 0..1 (0 is
noise), and its output is negated for the flow-matching Euler step; sigmas are linspace(1, 1/N, N) under the
scheduler's fixed shift 3. The caption is kept padded with its mask beside it (`added["mask"]`), so a CFG pair
batches like any other and each half reads only its own tokens.

Turbo and Base have the same weights (probe reads the variant from names): Turbo is step- and CFG-distilled
(9 steps, no CFG, as its model card and diffusers' example render it); Base renders with CFG in 50 steps at the
model card's guidance_scale 4, whose `pos + 4·(pos − neg)` is CFG scale 5 as A1111 and ComfyUI count it
(`neg + 5·(pos − neg)`). Where neither the folder's path nor the file's name says Base, Turbo is assumed: most
Z-Image checkpoints and LoRAs are Turbo's. A ComfyUI single file is renamed into the diffusers transformer in
memory, never written out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from adapterzoo.formats.checkpoint.layout_checkpoint import fit, to_diffusers_plan
from adapterzoo.formats.families.zimage.checkpoint import TITLE, UNUSED, comfy_tensors, config_from_shapes
from adapterzoo.formats.families.zimage.modules import ZIMAGE_CLASS
from adapterzoo.formats.families.zimage.probe import COMFY_MARKER, checkpoint_prefix, variant_hint
from adapterzoo.formats.io.safetensors_writer import planned_tensor
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.chat_prompt import chat_hidden_states
from adapterzoo.formats.model.parts_pipeline import PartsPipeline, TransformerDenoiser

NATIVE_SIDE = 1024
CAPTION_TOKENS = 512  # ZImagePipeline's max_sequence_length
TURBO_STEPS, BASE_STEPS = 9, 50  # the model cards' and diffusers' examples
BASE_CFG = 5.0  # the Base card's guidance_scale 4 in ZImagePipeline's form (pos + 4·(pos − neg))
# Tongyi-MAI/Z-Image-Turbo's scheduler_config.json (FlowMatchEulerDiscreteScheduler), taken for Base as well
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}


def flow_sigmas(steps: int) -> list[float]:
    """ZImagePipeline's sigmas for `steps` steps (get_default_z_image_sigmas), before the scheduler's shift."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


def transformer_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers ZImageTransformer2DModel of a ComfyUI (or diffusers-named) single file: meta-initialised,
    tensors assigned; its path kept as `_name_or_path`, where the variant is read."""
    from diffusers import ZImageTransformer2DModel

    source = open_checkpoint_file(path)
    prefix = checkpoint_prefix(source.shapes)
    shapes = {k[len(prefix):]: tuple(v) for k, v in source.shapes.items() if k.startswith(prefix)}
    config = config_from_shapes(shapes)
    if COMFY_MARKER in shapes:
        plan, _ = to_diffusers_plan(source, prefix, comfy_tensors(config, shapes, True), dtype)
    else:
        plan = [source.planned(prefix + k, k, dtype) for k in shapes if k != UNUSED]
    plan = fit(ZIMAGE_CLASS, config, plan, TITLE)
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(config)
    model.load_state_dict({planned.name: planned_tensor(planned) for planned in plan}, strict=True, assign=True)
    model.register_to_config(_name_or_path=str(path))
    return model


def is_base(transformer: torch.nn.Module) -> bool:
    """Whether where the transformer was loaded from names Z-Image Base (else Turbo is assumed)."""
    hint = variant_hint({"path": str(transformer.config.get("_name_or_path", ""))})
    return hint is not None and hint[0] == "base"


class ZImageDenoiser(TransformerDenoiser):
    """The transformer called as a UNet: (latents [B, C, h, w], t on 0..1000, padded caption states, {mask}) ->
    the flow prediction the Euler step takes (the transformer's output negated, as ZImagePipeline does)."""

    patch = 2  # ZImagePipeline's image sides are multiples of the VAE factor × 2

    def __init__(self, transformer: torch.nn.Module, latent_factor: int, base: bool) -> None:
        super().__init__(transformer, SimpleNamespace(in_channels=transformer.config.in_channels,
                                                      sample_size=NATIVE_SIDE // latent_factor))
        self.cfg = base
        self.cfg_scale = BASE_CFG

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor], return_dict: bool = False) -> tuple[torch.Tensor]:
        b = x.shape[0]
        timestep = ((1000 - t.float()) / 1000).expand(b)
        images = list(x.to(self.dtype).unsqueeze(2).unbind(0))
        captions = [states[mask] for states, mask in zip(encoder_hidden_states, added_cond_kwargs["mask"])]
        out = self.transformer(images, timestep, captions, return_dict=False)[0]
        return (-torch.stack([o.float() for o in out]).squeeze(2).to(x.dtype),)


class ZImageForSampling(PartsPipeline):
    """The parts of a Z-Image pipeline, as verify's loop and the run-time hooks reach them."""

    def __init__(self, parts: dict[str, Any]) -> None:
        super().__init__()
        self.transformer, self.vae, self.scheduler = parts["transformer"], parts["vae"], parts["scheduler"]
        self.text_encoder, self.tokenizer = parts["text_encoder"], parts["tokenizer"]
        base = is_base(self.transformer)
        self.unet = ZImageDenoiser(self.transformer, 2 ** (len(self.vae.config.block_out_channels) - 1), base)
        self.default_steps = BASE_STEPS if base else TURBO_STEPS
        self.guidance = None if base else {"guidance": "none"}  # Turbo's CFG is distilled into it

    @torch.no_grad()
    def encode_conditioning(self, prompt: str, ids: Callable[..., torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Qwen3's next-to-last hidden states of the chat-wrapped prompt padded to 512 tokens, {"mask": which are
        the prompt's}) as ZImagePipeline._encode_prompt computes them; no embedding slot reads Qwen3, so `ids` is
        not asked."""
        hidden, mask = chat_hidden_states(self.tokenizer, self.text_encoder, prompt, CAPTION_TOKENS, thinking=True)
        return hidden[-2].to(self.transformer.dtype), {"mask": mask}


def assemble(parts: dict[str, Any]) -> ZImageForSampling:
    return ZImageForSampling(parts)


def scheduler(transformer: torch.nn.Module) -> Any:
    """Z-Image's scheduler, when no folder gives one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
