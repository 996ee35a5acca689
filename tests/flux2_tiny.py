"""A tiny Flux.2 Klein pipeline from diffusers and transformers classes: a Flux2Transformer2DModel, an
AutoencoderKLFlux2 with a batch norm of its own statistics, a 27-layer Qwen3ForCausalLM (Klein reads layers 9,
18, 27) and Z-Image's test tokenizer (no network): a diffusers folder, and BFL's single file of the transformer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM
from zimage_tiny import SPECIALS, byte_alphabet, tiny_tokenizer

from adapterzoo.formats.families.flux2.checkpoint import LAYOUT
from adapterzoo.formats.io.safetensors_writer import planned_tensor

CAP = 32  # Qwen3's width; the transformer reads 3 layers side by side: joint_attention_dim 96
LATENT = 4  # the VAE's latent channels; 2×2 patches: the transformer's in_channels 16
CLASSES = {"transformer": ("diffusers", "Flux2Transformer2DModel"), "vae": ("diffusers", "AutoencoderKLFlux2"),
           "text_encoder": ("transformers", "Qwen3ForCausalLM"), "tokenizer": ("transformers", "Qwen2Tokenizer"),
           "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler")}


def tiny_transformer(guidance: bool = False) -> Flux2Transformer2DModel:
    """One double and one single block, 2 heads of 16; a guidance embedding only as Flux.2 dev has one."""
    torch.manual_seed(0)
    return Flux2Transformer2DModel(patch_size=1, in_channels=4 * LATENT, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * CAP,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
                                   guidance_embeds=guidance).eval()


def tiny_vae() -> AutoencoderKLFlux2:
    """Factor 2 (16 with the 2×2 patches); the batch norm's running mean and variance not the identity's."""
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(32, 32), layers_per_block=1, latent_channels=LATENT,
                             sample_size=32)
    vae.bn.running_mean.copy_(torch.randn(4 * LATENT) * 0.5)
    vae.bn.running_var.copy_(torch.rand(4 * LATENT) + 0.5)
    return vae.eval()


def tiny_qwen3() -> Qwen3ForCausalLM:
    """Narrow (one head), 27 layers deep, with Qwen3-4B's rope base, norm epsilon and length."""
    torch.manual_seed(2)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=len(byte_alphabet()) + len(SPECIALS), hidden_size=CAP,
                                        intermediate_size=32, num_hidden_layers=27, num_attention_heads=1,
                                        num_key_value_heads=1, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                        max_position_embeddings=40960, tie_word_embeddings=True)).eval()


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.2's scheduler_config.json: a dynamic, exponential time shift whose mu the pipeline gives."""
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096,
                                           time_shift_type="exponential")


def save_tiny_klein(folder: Path, distilled: bool = True, parts: tuple[str, ...] = tuple(CLASSES)) -> Path:
    """A diffusers Flux2KleinPipeline folder holding `parts`; model_index.json says `is_distilled`."""
    makers = {"transformer": tiny_transformer, "vae": tiny_vae, "text_encoder": tiny_qwen3,
              "tokenizer": tiny_tokenizer, "scheduler": tiny_scheduler}
    index = {"_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.0", "is_distilled": distilled}
    for name in parts:
        makers[name]().save_pretrained(folder / name)
        index[name] = list(CLASSES[name])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def save_bfl_file(path: Path, transformer_folder: Path) -> Path:
    """BFL's single file of a transformer folder, by adapterzoo's converter (held to diffusers' in test_flux2)."""
    _, plan, _ = LAYOUT.folder_to_file(transformer_folder, None)
    save_file({"model.diffusion_model." + p.name: planned_tensor(p).contiguous() for p in plan}, str(path))
    return path
