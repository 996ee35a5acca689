"""SD3/SD3.5 as verify's loop renders it: the MMDiT behind a UNet's call, prompts through CLIP-L, CLIP-G and T5.

The MMDiT takes [B, C, h, w] latents and a timestep on 0..1000 like a UNet, so the wrapper only renames the
conditioning; guidance is classifier-free with the flow-matching scheduler spacing its own timesteps and
applying its shift, as diffusers' StableDiffusion3Pipeline does (so the family declares no `flow_sigmas`).
An SAI single file is renamed into the diffusers transformer in memory by diffusers' own converter (it reads
any width), never written out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from adapterzoo.formats.families.sd3.modules import config_from_sai
from adapterzoo.formats.families.sd3.probe import sai_prefix
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.parts_pipeline import PartsPipeline, TransformerDenoiser

T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length
# the scheduler_config.json of SD3 Medium and of SD3.5 Large, Large Turbo and Medium alike
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def transformer_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers SD3Transformer2DModel of an SAI single file: meta-initialised, tensors assigned."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    source = open_checkpoint_file(path)
    prefix = sai_prefix(source.shapes)
    names = [key for key in source.shapes if key.startswith(prefix)]
    config = config_from_sai({key[len(prefix):]: tuple(source.shapes[key]) for key in names})
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)
    tensors = {key[len(prefix):]: source.get(key).to(dtype) for key in names}
    model.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(tensors), strict=True, assign=True)
    return model


class SD3Denoiser(TransformerDenoiser):
    """The MMDiT called as a UNet: (latents, t on 0..1000, token states, {pooled}) -> the flow prediction."""

    cfg = True

    def __init__(self, transformer: torch.nn.Module) -> None:
        config = transformer.config
        super().__init__(transformer, SimpleNamespace(in_channels=config.in_channels, sample_size=config.sample_size))

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor], return_dict: bool = False) -> tuple[torch.Tensor]:
        out = self.transformer(hidden_states=x, timestep=t.to(x.dtype).expand(x.shape[0]),
                               encoder_hidden_states=encoder_hidden_states,
                               pooled_projections=added_cond_kwargs["pooled"], return_dict=False)[0]
        return (out,)


class SD3ForSampling(PartsPipeline):
    """The parts of an SD3 pipeline, as verify's loop and the run-time hooks reach them."""

    def __init__(self, parts: dict[str, Any]) -> None:
        super().__init__()
        self.transformer, self.vae, self.scheduler = parts["transformer"], parts["vae"], parts["scheduler"]
        self.text_encoder, self.tokenizer = parts["text_encoder"], parts["tokenizer"]
        self.text_encoder_2, self.tokenizer_2 = parts["text_encoder_2"], parts["tokenizer_2"]
        self.text_encoder_3, self.tokenizer_3 = parts.get("text_encoder_3"), parts.get("tokenizer_3")
        self.unet = SD3Denoiser(self.transformer)

    @torch.no_grad()
    def encode_conditioning(self, prompt: str, ids: Callable[..., torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(CLIP-L|CLIP-G penultimate states padded to T5's width, then T5's states; {"pooled": both CLIP
        projections}) as StableDiffusion3Pipeline.encode_prompt computes them (no clip skip); `ids(encoder,
        length)` tokenizes the prompt for that text encoder (an embedding's placeholders in it)."""
        device = self.device
        states, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            out = getattr(self, name)(ids(name).to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        width = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is None:
            t5 = torch.zeros(1, T5_TOKENS, width, device=device, dtype=clip.dtype)
        else:
            limit = min(T5_TOKENS, self.tokenizer_3.model_max_length)
            t5 = self.text_encoder_3(ids("text_encoder_3", limit).to(device))[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        dtype = self.transformer.dtype
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2).to(dtype), {"pooled": torch.cat(pooled, -1).to(dtype)}


def assemble(parts: dict[str, Any]) -> SD3ForSampling:
    return SD3ForSampling(parts)


def scheduler(transformer: torch.nn.Module) -> Any:
    """SD3's and SD3.5's scheduler (the same for every release), when no folder gives one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
