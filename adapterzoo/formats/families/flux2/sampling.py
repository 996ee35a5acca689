"""Flux.2 Klein (4B, 9B; distilled and base) as verify's loop renders it, as diffusers' Flux2KleinPipeline (0.42)
does: Qwen3 reads the prompt, 2×2 patches of the 32-channel VAE latents are the tokens, no text mask.

What Flux2KleinPipeline does, step by step: the prompt is wrapped in Qwen3's chat template (a user turn, the
assistant's opened, thinking off), padded to 512 tokens, and Qwen3's hidden states after layers 9, 18 and 27 are
concatenated per token (3 × 2560 = 7680 for 4B, 3 × 4096 = 12288 for 9B); the transformer reads all 512, padding
included. The noise is drawn in the patched, batch-normalised space ([B, 128, H/16, W/16]: the loop's latents,
so a seed gives diffusers' noise); each latent pixel is a token with position (0, row, column, 0), each text
token (0, 0, 0, index); the timestep goes in on 0..1. Sigmas are linspace(1, 1/N, N) under the exponential
time shift at mu = compute_empirical_mu(tokens, N) (a fit of BFL's, depending on the step count too). Decoding
undoes the VAE's batch norm (its running mean and variance) and the 2×2 patching (`PatchedVae`).

The distilled Kleins (FLUX.2-klein-4B, -9B) render in 4 steps without CFG (the model cards' and BFL's
defaults; the pipeline ignores guidance for them); the base ones (FLUX.2-klein-base-*) with CFG 4 and the empty
negative prompt in 50 steps (the pipeline's defaults). A folder says which (`is_distilled` in model_index.json);
a single file by its name (BFL's `flux-2-klein-base-4b`), distilled where it does not say base. Flux.2 dev is
refused: its Mistral Small 3.1 text encoder has no path here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model.chat_prompt import chat_hidden_states
from adapterzoo.formats.model.parts_pipeline import PartsPipeline, TransformerDenoiser

NATIVE_SIDE = 1024  # Flux2KleinPipeline's default_sample_size (128) × the VAE's factor (8)
CAPTION_TOKENS = 512  # Flux2KleinPipeline's max_sequence_length
LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
DISTILLED_STEPS, BASE_STEPS = 4, 50  # the distilled model cards' (guidance 1: none); the pipeline's defaults
BASE_CFG = 4.0  # Flux2KleinPipeline's guidance_scale: neg + 4·(pos − neg), as A1111 counts CFG
PATCH = 2  # the VAE's latents are packed 2×2 into 4 × 32 = 128 channels before the transformer
# FLUX.2's scheduler_config.json (FlowMatchEulerDiscreteScheduler): with a dynamic shift only its exponential time
# shift is used; mu is the pipeline's own (`flow_mu`)
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential"}
DEV_REFUSED = ("Flux.2 dev is not rendered by verify and sample yet: its text encoder, Mistral Small 3.1 "
               "(Mistral3ForConditionalGeneration with a system prompt and Pixtral's processor), has no path here; "
               "Flux.2 Klein 4B and 9B render")


def flow_mu(shape: tuple[int, ...], steps: int) -> float:
    """Flux2KleinPipeline's mu for latents of `shape` (one token per patched latent pixel) and `steps` steps."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=shape[-2] * shape[-1], num_steps=steps)


def transformer_from_file(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The diffusers Flux2Transformer2DModel of a BFL (or diffusers-named) single file, in memory; its path kept
    as `_name_or_path`, where a base Klein is told from a distilled one."""
    from adapterzoo.formats.families.flux2.checkpoint import LAYOUT

    model = LAYOUT.file_to_model(open_checkpoint_file(path), dtype)
    model.register_to_config(_name_or_path=str(path))
    return model


def refuse(transformer: torch.nn.Module) -> str | None:
    """Flux.2 dev (the one member with a guidance embedding) is not rendered."""
    return DEV_REFUSED if transformer.config.guidance_embeds else None


def is_distilled(transformer: torch.nn.Module) -> bool:
    """A folder's `is_distilled` (model_index.json beside transformer/, diffusers' default False), else whether the
    file's name (a bare transformer folder's: its parent's) does not say base."""
    where = Path(str(transformer.config.get("_name_or_path", "")))
    index = where.parent / "model_index.json"
    if where.name == "transformer" and index.is_file():
        return bool(read_json_object(index).get("is_distilled", False))
    return "base" not in (where.parent.name if where.name == "transformer" else where.name).lower()


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] VAE latents -> [B, 4C, h/2, w/2], each 2×2 patch's values channel-major (the pipeline's)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c // (PATCH * PATCH), PATCH, PATCH, h, w).permute(0, 1, 4, 2, 5, 3)
    return patches.reshape(b, c // (PATCH * PATCH), h * PATCH, w * PATCH)


class PatchedVae(torch.nn.Module):
    """AutoencoderKLFlux2 as the loop decodes with it: its latents patched and batch-normalised (no scaling or
    shift factor beside), so a latent pixel is 16 image pixels."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.latent_factor = 2 ** (len(vae.config.block_out_channels) - 1) * PATCH
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None,
                                      latent_channels=vae.config.latent_channels * PATCH * PATCH)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        """The image of the loop's latents: the batch norm undone with its running statistics, then unpatched."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents.device,
                                                                                               latents.dtype)
        return self.vae.decode(unpatchify(latents * std + mean), return_dict=False)


def positions(rows: int, columns: int, tokens: int = 1, device: torch.device | None = None) -> torch.Tensor:
    """(t, h, w, l) position ids as Flux2KleinPipeline makes them: an image's rows × columns, or a caption's tokens."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(rows), torch.arange(columns),
                                torch.arange(tokens)).to(device)


class KleinDenoiser(TransformerDenoiser):
    """The transformer called as a UNet: (patched latents [B, 128, h, w], t on 0..1000, Qwen3 states) -> the flow
    prediction; a base Klein is guided by a CFG pair at the pipeline's 4."""

    patch = 1  # the loop's latents are the VAE's already patched (`PatchedVae.latent_factor`)
    cfg_scale = BASE_CFG

    def __init__(self, transformer: torch.nn.Module, latent_factor: int, distilled: bool) -> None:
        super().__init__(transformer, SimpleNamespace(in_channels=transformer.config.in_channels,
                                                      sample_size=NATIVE_SIDE // latent_factor))
        self.cfg = not distilled

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None, return_dict: bool = False
                ) -> tuple[torch.Tensor]:
        b, c, h, w = x.shape
        tokens = x.reshape(b, c, h * w).permute(0, 2, 1).to(self.dtype)
        out = self.transformer(hidden_states=tokens, timestep=(t.to(x.dtype) / 1000).expand(b), guidance=None,
                               encoder_hidden_states=encoder_hidden_states,
                               txt_ids=positions(1, 1, encoder_hidden_states.shape[1], x.device),
                               img_ids=positions(h, w, device=x.device), return_dict=False)[0]
        return (out.permute(0, 2, 1).reshape(b, c, h, w).to(x.dtype),)


class KleinForSampling(PartsPipeline):
    """The parts of a Flux.2 Klein pipeline, as verify's loop and the run-time hooks reach them."""

    def __init__(self, parts: dict[str, Any]) -> None:
        super().__init__()
        self.transformer, self.scheduler = parts["transformer"], parts["scheduler"]
        self.text_encoder, self.tokenizer = parts["text_encoder"], parts["tokenizer"]
        self.vae = PatchedVae(parts["vae"])
        check_text_encoder(self.text_encoder.config, self.transformer.config)
        distilled = is_distilled(self.transformer)
        self.unet = KleinDenoiser(self.transformer, self.vae.latent_factor, distilled)
        self.default_steps = DISTILLED_STEPS if distilled else BASE_STEPS
        self.guidance = {"guidance": "none"} if distilled else None  # the distilled Kleins' CFG is in them

    @torch.no_grad()
    def encode_conditioning(self, prompt: str, ids: Callable[..., torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Qwen3's states after layers 9, 18 and 27 side by side per token, all 512 (padding included), as
        Flux2KleinPipeline._get_qwen3_prompt_embeds computes them; no embedding slot reads Qwen3."""
        hidden, _ = chat_hidden_states(self.tokenizer, self.text_encoder, prompt, CAPTION_TOKENS, thinking=False)
        states = torch.cat([hidden[layer] for layer in LAYERS], dim=-1)
        return states.to(self.device, self.transformer.dtype), {}


def check_text_encoder(encoder: Any, transformer: Any) -> None:
    """Qwen3 deep enough for layer 27 and as wide as a third of what the transformer reads (4B's for Klein 4B,
    8B's for Klein 9B): one line where the parts do not fit, not a shape error mid-render."""
    from adapterzoo.errors import AdapterzooError

    if encoder.num_hidden_layers < LAYERS[-1]:
        raise AdapterzooError(f"the text encoder has {encoder.num_hidden_layers} layers; Flux.2 Klein reads "
                              f"layers {', '.join(map(str, LAYERS))} (Qwen3-4B or -8B)")
    if len(LAYERS) * encoder.hidden_size != transformer.joint_attention_dim:
        raise AdapterzooError(f"the text encoder is {encoder.hidden_size} wide, the transformer reads "
                              f"{len(LAYERS)} × {transformer.joint_attention_dim // len(LAYERS)}: Klein 4B takes "
                              "Qwen3-4B, Klein 9B Qwen3-8B")


def assemble(parts: dict[str, Any]) -> KleinForSampling:
    return KleinForSampling(parts)


def scheduler(transformer: torch.nn.Module) -> Any:
    """Flux.2's scheduler, when no folder gives one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER)
