"""Probe full checkpoints and their parts (denoiser, VAE, ControlNet) by key families (FORMATS.md §5).

Each model family recognises its own checkpoints, asked in detection order; a VAE on its own is judged
here, its base read from its latent width where a family claims that width.
"""

from __future__ import annotations

from adapterzoo.formats.io.probe_result import ProbeResult
from adapterzoo.formats.io.tensor_table import TensorTable
from adapterzoo.formats.model.registry import families, first


def _is_vae(keys: list[str]) -> bool:
    stripped = [k.removeprefix("first_stage_model.").removeprefix("vae.") for k in keys]
    return any(k.startswith("encoder.conv_in.") for k in stripped) and any(
        k.startswith("decoder.conv_out.") for k in stripped
    )


def probe_checkpoint(table: TensorTable, result: ProbeResult) -> bool:
    """Fill `result` if the tensors are a checkpoint, a checkpoint part, a VAE or a ControlNet."""
    if any(family.probe_checkpoint(table, result) for family in families()):
        return True
    keys = list(table)
    if not _is_vae(keys):
        return False
    result.kind, result.format = "vae", "ldm" if any("encoder.down.0." in k for k in keys) else "diffusers"
    z = next((m.shape[0] for k, m in table.items() if k.endswith("quant_conv.weight")
              and not k.endswith("post_quant_conv.weight")), None)
    if z is not None:
        result.details["latent_channels"] = z // 2
        result.base = first(family.vae_latents.get(z // 2) for family in families()) or "unknown"
    return True
