"""Chroma as verify's loop renders it: Flux.1's packed latents and position ids, T5 alone, real CFG.

The loop follows diffusers' ChromaPipeline (0.42): T5 reads the prompt with its attention mask, and the
transformer's text mask keeps the prompt's tokens and the first padding token (Chroma's rule; the image tokens
all); the approximator is fed no guidance strength (ChromaPipeline gives it 0), so guidance is classifier-free:
scale 5 with the empty negative prompt, 35 steps, FluxPipeline's sigmas linspace(1, 1/N) under the scheduler's
shift. A BFL single file is renamed into the diffusers transformer in memory by the family's layout, never
written out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapterzoo.formats.families.flux.sampling import DEV_SCHEDULER, FluxDenoiser, pack, unpack
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.parts_pipeline import PartsPipeline

T5_TOKENS = 512  # ChromaPipeline's max_sequence_length
GUIDANCE_SCALE = 5.0  # ChromaPipeline's default guidance_scale
STEPS = 35  # ChromaPipeline's default num_inference_steps


def transformer_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers ChromaTransformer2DModel of a BFL (or diffusers-named) single file, in memory."""
    from adapterzoo.formats.families.chroma.checkpoint import LAYOUT

    return LAYOUT.file_to_model(open_checkpoint_file(path), dtype)


class ChromaDenoiser(FluxDenoiser):
    """The transformer called as a UNet: (latents [B, C, h, w], t on 0..1000, T5 states, {text mask}) -> the flow
    prediction, guided by a CFG pair at ChromaPipeline's scale; Flux.1's packing and native size (ChromaPipeline's
    default_sample_size 128 × the VAE's 8 = 1024)."""

    cfg = True
    cfg_scale = GUIDANCE_SCALE

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor], return_dict: bool = False) -> tuple[torch.Tensor]:
        b = x.shape[0]
        packed, img_ids = pack(x)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        text = added_cond_kwargs["mask"]
        mask = torch.cat([text, text.new_ones(b, packed.shape[1])], dim=1)  # every image token attends
        out = self.transformer(hidden_states=packed, timestep=(t.to(x.dtype) / 1000).expand(b),
                               encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, img_ids=img_ids,
                               attention_mask=mask, return_dict=False)[0]
        return (unpack(out, x.shape),)


class ChromaForSampling(PartsPipeline):
    """The parts of a Chroma pipeline, as verify's loop and the run-time hooks reach them."""

    default_steps = STEPS

    def __init__(self, parts: dict[str, Any]) -> None:
        super().__init__()
        self.transformer, self.vae, self.scheduler = parts["transformer"], parts["vae"], parts["scheduler"]
        self.text_encoder, self.tokenizer = parts["text_encoder"], parts["tokenizer"]
        self.unet = ChromaDenoiser(self.transformer, 2 ** (len(self.vae.config.block_out_channels) - 1))

    @torch.no_grad()
    def encode_conditioning(self, prompt: str, ids: Callable[..., torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(T5 token states, {"mask": the transformer's text mask}) as ChromaPipeline._get_t5_prompt_embeds computes
        them; `ids(encoder, length, mask)` tokenizes the prompt for that text encoder (an embedding's placeholders
        in it), or gives the tokenizer's attention mask of those ids."""
        device, dtype = self.device, self.transformer.dtype
        limit = min(T5_TOKENS, self.tokenizer.model_max_length)
        mask = ids("text_encoder", limit, mask=True).to(device)
        states = self.text_encoder(ids("text_encoder", limit).to(device), attention_mask=mask,
                                   output_hidden_states=False)[0]
        text = (torch.arange(limit, device=device) <= mask.sum(dim=1, keepdim=True)).to(dtype)
        return states.to(dtype), {"mask": text}


def assemble(parts: dict[str, Any]) -> ChromaForSampling:
    return ChromaForSampling(parts)


def scheduler(transformer: torch.nn.Module) -> Any:
    """When no folder gives one: FLUX.1-dev's flow-matching scheduler, whose shift follows the image's tokens
    (mu from 0.5 at 256 to 1.15 at 4096); at Chroma1-HD's 1024×1024 that is mu 1.15, ComfyUI's fixed Chroma shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(DEV_SCHEDULER)
