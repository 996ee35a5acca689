"""Load a standalone VAE file to decode a checkpoint's latents: LDM names (A1111's `vae-ft-mse...`) or diffusers'.

An LDM VAE gets its config from its tensor shapes (FORMATS.md §2.4); a diffusers-named file uses a
`config.json` beside it, else the checkpoint's own VAE config. Either way the scaling factor stays the
checkpoint's: the VAE must decode the latents that checkpoint makes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from adapterzoo.errors import AdapterzooError, BadFileError
from adapterzoo.formats.checkpoint.shape_reading import vae_config_from_ldm
from adapterzoo.formats.io.json_file import read_json_object
from adapterzoo.formats.io.tensor_source import open_checkpoint_file
from adapterzoo.formats.model import vae_names

PREFIXES = (vae_names.LDM_PREFIX, "vae.")


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    source = open_checkpoint_file(path)
    state = {}
    for key in source.shapes:
        name = key
        for prefix in PREFIXES:
            name = name.removeprefix(prefix)
        state[name] = source.get(key)
    return state


def _ldm_to_diffusers(state: dict[str, torch.Tensor], like: AutoencoderKL) -> tuple[dict, dict[str, torch.Tensor]]:
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    config = vae_config_from_ldm(shapes, like.config.sample_size, like.config.scaling_factor)
    levels = len(config["down_block_types"])
    renamed = {}
    for key, tensor in state.items():
        name = vae_names.ldm_to_diffusers_vae(key, levels)
        if name is None:
            raise BadFileError(f"VAE tensor {key} has no place in a diffusers AutoencoderKL")
        if vae_names.is_attention_weight(key) and tensor.dim() == 4:
            tensor = tensor.reshape(tensor.shape[:2])
        renamed[name] = tensor
    return config, renamed


def load_vae(path: Path, base: str, like: AutoencoderKL) -> AutoencoderKL:
    """The VAE in `path` as an AutoencoderKL on `like`'s device and dtype, with `like`'s scaling factor; refused in
    one line where the checkpoint renders with another kind of VAE (Flux.2's patched, batch-normalised one)."""
    if not isinstance(like, AutoencoderKL):
        raise AdapterzooError(f"{Path(path).name}: a lone VAE file is verified on checkpoints whose VAE is an "
                              f"AutoencoderKL; a {base} checkpoint renders with another")
    state = _state_dict(Path(path))
    if "encoder.down.0.block.0.conv1.weight" in state:
        config, state = _ldm_to_diffusers(state, like)
    else:
        beside = Path(path).with_name("config.json")
        config = read_json_object(beside) if beside.is_file() else dict(like.config)
    config = {**config, "scaling_factor": like.config.scaling_factor}
    latent = config.get("latent_channels", 4)
    if latent != like.config.latent_channels:
        raise AdapterzooError(f"a VAE with {latent} latent channels, {base} checkpoint "
                              f"({like.config.latent_channels}): it cannot decode these latents")
    vae = AutoencoderKL.from_config(config)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BadFileError(f"the VAE's tensors do not fit an AutoencoderKL: {str(exc).splitlines()[1].strip()}"
                           ) from None
    return vae.to(like.device, like.dtype).eval().requires_grad_(False)
