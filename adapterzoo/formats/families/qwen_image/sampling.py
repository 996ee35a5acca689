"""Qwen-Image as verify's loop renders it: Flux.1's packed latents, Qwen2.5-VL's states, true CFG renormed.

What QwenImagePipeline (diffusers 0.42) does, step by step: the prompt is put in its system template, Qwen2.5-VL
reads it (its language model; the vision tower is never asked) and the last hidden states of the real tokens, less
the template's first 34 tokens (the system turn), are the caption, at most 512 of them. The transformer takes
2×2-packed latents, the timestep on 0..1 and the caption with its mask; sigmas are linspace(1, 1/N, N) under the
scheduler's dynamic shift (exponential, mu from the image's tokens, Qwen/Qwen-Image's scheduler_config.json).
Guidance is true CFG at the model card's `true_cfg_scale` 4 (`neg + 4·(pos − neg)`, as A1111 counts it), 50 steps,
the guided prediction rescaled per token to the norm of the positive one; the pipeline's own default skips CFG
where no negative prompt is given, the model card gives one, verify's is empty (recorded). The caption is kept
padded to 512 with its mask (`added["mask"]`), so a CFG pair batches and each half reads only its own tokens;
the transformer is handed the captions cut after the longest one's tokens (the rest is padding in every row).
The VAE is Qwen-Image's own (Wan's kind, latents normalised per channel). A ComfyUI single file is the diffusers
transformer under the same names, loaded in memory, never written out.

Qwen-Image-Edit (2509, 2511) renders from an input image its VL encoder reads and whose latents join the sequence,
and Layered renders RGBA layers of an input image: neither is this text-to-image loop, so both are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.families.flux.sampling import pack, unpack
from adapterzoo.formats.families.qwen_image.probe import EDIT
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.parts_pipeline import PartsPipeline, TransformerDenoiser

# QwenImagePipeline's prompt_template_encode and prompt_template_encode_start_idx (the system turn's tokens)
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
DROPPED = 34
TOKENIZER_TOKENS = 1024  # QwenImagePipeline's tokenizer_max_length (after the dropped tokens)
CAPTION_TOKENS = 512  # QwenImagePipeline's max_sequence_length
CFG_SCALE = 4.0  # QwenImagePipeline's and the model card's true_cfg_scale
STEPS = 50  # the model card's num_inference_steps (the pipeline's default too)
NATIVE_SIDE = 1024  # QwenImagePipeline's default_sample_size (128) × the VAE's factor (8)
# Qwen/Qwen-Image's scheduler_config.json (FlowMatchEulerDiscreteScheduler)
SCHEDULER = {"num_train_timesteps": 1000, "base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5,
             "max_shift": 0.9, "shift": 1.0, "shift_terminal": 0.02, "use_dynamic_shifting": True,
             "time_shift_type": "exponential"}


def flow_sigmas(steps: int) -> np.ndarray:
    """QwenImagePipeline's sigmas for `steps` steps, before the scheduler's dynamic shift."""
    return np.linspace(1.0, 1 / steps, steps)


def transformer_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers QwenImageTransformer2DModel of a ComfyUI (or diffusers-named) single file, in memory; its path
    kept as `_name_or_path`, where Edit is told."""
    from adapterzoo.formats.families.qwen_image.checkpoint import LAYOUT

    model = LAYOUT.file_to_model(open_checkpoint_file(path), dtype)
    model.register_to_config(_name_or_path=str(path))
    return model


def refuse_image_models(transformer: torch.nn.Module) -> None:
    """Edit and Layered render from an input image: one line saying so (naming where the model was loaded from,
    whose path tells Edit), before anything is rendered."""
    config = transformer.config
    where = str(config.get("_name_or_path", "")) or "this model"
    if config.get("use_additional_t_cond"):
        raise AdapterzooError(f"{where} is Qwen-Image-Layered, which decomposes an input image into layers; verify "
                              "and sample render text to image: use Qwen-Image")
    if config.get("zero_cond_t") or EDIT.search(where):
        raise AdapterzooError(f"{where} is Qwen-Image-Edit, which renders from an input image; verify and sample "
                              "render text to image: verify its LoRAs against Qwen-Image")


def renormed(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """QwenImagePipeline's true CFG: `neg + scale·(pos − neg)`, rescaled per packed token (a 2×2 patch of every
    channel) to the positive prediction's norm."""
    guided = uncond + scale * (cond - uncond)
    tokens, _ = pack(guided)
    ratio = pack(cond)[0].norm(dim=-1, keepdim=True) / tokens.norm(dim=-1, keepdim=True)
    return unpack(tokens * ratio, guided.shape)


class QwenImageDenoiser(TransformerDenoiser):
    """The transformer called as a UNet: (latents [B, C, h, w], t on 0..1000, padded caption states, {mask}) -> the
    flow prediction; a CFG pair combined and renormed as QwenImagePipeline does (`combine`)."""

    cfg = True
    patch = 2  # 2×2 latent patches packed into one token, as Flux.1
    cfg_scale = CFG_SCALE

    def __init__(self, transformer: torch.nn.Module, latent_factor: int) -> None:
        super().__init__(transformer, SimpleNamespace(in_channels=transformer.config.in_channels // 4,
                                                      sample_size=NATIVE_SIDE // latent_factor))

    @staticmethod
    def combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        return renormed(uncond, cond, scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor], return_dict: bool = False) -> tuple[torch.Tensor]:
        b, _, h, w = x.shape
        packed, _ = pack(x)
        mask = added_cond_kwargs["mask"]
        longest = int(mask.sum(dim=1).max())  # captions start at 0: past the longest, every token is padding
        out = self.transformer(hidden_states=packed, timestep=(t.to(x.dtype) / 1000).expand(b),
                               encoder_hidden_states=encoder_hidden_states[:, :longest],
                               encoder_hidden_states_mask=mask[:, :longest],
                               img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return (unpack(out, x.shape),)


class QwenImageForSampling(PartsPipeline):
    """The parts of a Qwen-Image pipeline, as verify's loop and the run-time hooks reach them."""

    default_steps = STEPS

    def __init__(self, parts: dict[str, Any]) -> None:
        super().__init__()
        self.transformer, self.vae, self.scheduler = parts["transformer"], parts["vae"], parts["scheduler"]
        self.text_encoder, self.tokenizer = parts["text_encoder"], parts["tokenizer"]
        refuse_image_models(self.transformer)
        self.unet = QwenImageDenoiser(self.transformer, 2 ** len(self.vae.config.temperal_downsample))

    @torch.no_grad()
    def encode_conditioning(self, prompt: str, ids: Callable[..., torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(Qwen2.5-VL's last hidden states of the templated prompt less its system turn, padded to 512 tokens,
        {"mask": which are the prompt's}) as QwenImagePipeline._get_qwen_prompt_embeds computes them; no embedding
        slot reads Qwen2.5-VL, so `ids` is not asked."""
        tokens = self.tokenizer([TEMPLATE.format(prompt)], max_length=TOKENIZER_TOKENS + DROPPED, padding=True,
                                truncation=True, return_tensors="pt").to(self.device)
        states = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                   output_hidden_states=True).hidden_states[-1]
        kept = states[0][tokens.attention_mask[0].bool()][DROPPED:][:CAPTION_TOKENS]
        padded = kept.new_zeros(1, CAPTION_TOKENS, kept.shape[-1])
        padded[0, :len(kept)] = kept
        mask = torch.zeros(1, CAPTION_TOKENS, dtype=torch.bool, device=self.device)
        mask[0, :len(kept)] = True
        return padded.to(self.transformer.dtype), {"mask": mask}


def assemble(parts: dict[str, Any]) -> QwenImageForSampling:
    return QwenImageForSampling(parts)


def scheduler(transformer: torch.nn.Module) -> Any:
    """Qwen-Image's scheduler, when no folder gives one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
