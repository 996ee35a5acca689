"""Flux.1 as verify's loop renders it: the transformer behind a UNet's call, prompts through CLIP-L and T5.

Flux packs 2×2 latent patches into tokens and takes its timestep in [0, 1]; dev reads its guidance
strength through a distilled embedding (no CFG pair), schnell has none (FLUX.md). The wrapper hides
both, so the generic loop runs the latents as [B, C, h, w] like any UNet's. A BFL single file is
renamed into the diffusers transformer in memory, never written out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from adapterzoo.formats.families.flux.checkpoint import bfl_to_diffusers_plan
from adapterzoo.formats.io.safetensors_writer import planned_tensor
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.parts_pipeline import PartsPipeline, TransformerDenoiser

DEV_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, fed to dev's guidance embedding
NATIVE_SIDE = 1024
T5_TOKENS = 512  # FluxPipeline's max_sequence_length for dev
DEV_STEPS, SCHNELL_STEPS = 20, 4  # schnell is step-distilled: BFL and diffusers render it in 4 steps
# FLUX.1-dev's and FLUX.1-schnell's scheduler_config.json (FlowMatchEulerDiscreteScheduler)
SCHEDULER = {"num_train_timesteps": 1000, "base_image_seq_len": 256, "max_image_seq_len": 4096,
             "base_shift": 0.5, "max_shift": 1.15}
DEV_SCHEDULER = {**SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}
SCHNELL_SCHEDULER = {**SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def flow_sigmas(steps: int) -> np.ndarray:
    """FluxPipeline's sigmas for `steps` steps, before the scheduler's (dynamic) shift."""
    return np.linspace(1.0, 1 / steps, steps)


def transformer_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers FluxTransformer2DModel of a BFL single file: meta-initialised, tensors assigned."""
    from diffusers import FluxTransformer2DModel

    config, plan, _ = bfl_to_diffusers_plan(open_checkpoint_file(path), dtype)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model.load_state_dict({planned.name: planned_tensor(planned) for planned in plan}, strict=True, assign=True)
    return model


def pack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, C, h, w] latents as Flux's tokens [B, h·w/4, 4C] (2×2 patches packed), and their position ids [h·w/4, 3]
    (0, row, column), as FluxPipeline packs them."""
    b, c, h, w = x.shape
    packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
    ids[..., 1] += torch.arange(h // 2, device=x.device, dtype=x.dtype)[:, None]
    ids[..., 2] += torch.arange(w // 2, device=x.device, dtype=x.dtype)[None, :]
    return packed, ids.reshape(-1, 3)


def unpack(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The transformer's output tokens back as latents of `shape` [B, C, h, w]."""
    b, c, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class FluxDenoiser(TransformerDenoiser):
    """The transformer called as a UNet: (latents [B, C, h, w], t on 0..1000, T5 states, {pooled}) -> eps."""

    cfg = False
    patch = 2  # 2×2 latent patches packed into one token

    def __init__(self, transformer: torch.nn.Module, latent_factor: int) -> None:
        super().__init__(transformer, SimpleNamespace(in_channels=transformer.config.in_channels // 4,
                                                      sample_size=NATIVE_SIDE // latent_factor))

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor], return_dict: bool = False) -> tuple[torch.Tensor]:
        b = x.shape[0]
        packed, img_ids = pack(x)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        timestep = (t.to(x.dtype) / 1000).expand(b)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([b], DEV_GUIDANCE, device=x.device, dtype=torch.float32)
        out = self.transformer(hidden_states=packed, timestep=timestep, guidance=guidance,
                               pooled_projections=added_cond_kwargs["pooled"],
                               encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids,
                               img_ids=img_ids, return_dict=False)[0]
        return (unpack(out, x.shape),)


class FluxForSampling(PartsPipeline):
    """The parts of a Flux pipeline, as verify's loop and the run-time hooks reach them."""

    def __init__(self, parts: dict[str, Any]) -> None:
        super().__init__()
        self.transformer = parts["transformer"]
        self.vae = parts["vae"]
        self.text_encoder, self.tokenizer = parts["text_encoder"], parts["tokenizer"]
        self.text_encoder_2, self.tokenizer_2 = parts["text_encoder_2"], parts["tokenizer_2"]
        self.scheduler = parts["scheduler"]
        self.unet = FluxDenoiser(self.transformer, 2 ** (len(self.vae.config.block_out_channels) - 1))
        dev = self.transformer.config.guidance_embeds
        self.default_steps = DEV_STEPS if dev else SCHNELL_STEPS
        # dev reads its guidance through an embedding (no CFG pair, no negative prompt); schnell has none
        self.guidance = {"distilled_guidance": DEV_GUIDANCE} if dev else {"guidance": "none"}

    @torch.no_grad()
    def encode_conditioning(self, prompt: str, ids: Callable[..., torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(T5 token states, {"pooled": CLIP-L's pooled output}) as FluxPipeline.encode_prompt computes them;
        `ids(encoder, length)` tokenizes the prompt for that text encoder (an embedding's placeholders in it)."""
        device = self.device
        pooled = self.text_encoder(ids("text_encoder").to(device), output_hidden_states=False).pooler_output
        limit = min(T5_TOKENS, self.tokenizer_2.model_max_length)
        states = self.text_encoder_2(ids("text_encoder_2", limit).to(device), output_hidden_states=False)[0]
        dtype = self.transformer.dtype
        return states.to(dtype), {"pooled": pooled.to(dtype)}


def assemble(parts: dict[str, Any]) -> FluxForSampling:
    return FluxForSampling(parts)


def scheduler(transformer: torch.nn.Module) -> Any:
    """FLUX.1-dev's or -schnell's scheduler (by the guidance embedding), when no folder gives one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev = transformer.config.guidance_embeds
    return FlowMatchEulerDiscreteScheduler.from_config(DEV_SCHEDULER if dev else SCHNELL_SCHEDULER)
