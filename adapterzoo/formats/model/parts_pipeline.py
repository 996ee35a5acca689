"""What every DiT family's sampling spec assembles: a transformer behind a UNet's call, and its parts held
together the way verify's loop and the run-time hooks reach a diffusers pipeline."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

MODELS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")  # the parts with weights


class TransformerDenoiser(torch.nn.Module):
    """A transformer called as a UNet; a family's subclass writes `forward` and says `cfg` (a CFG pair or not)."""

    def __init__(self, transformer: torch.nn.Module, config: SimpleNamespace) -> None:
        super().__init__()
        self.transformer = transformer
        self.config = config  # what the loop reads of a UNet's config: in_channels, sample_size

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device


class PartsPipeline:
    """A pipeline's parts as attributes (a family's subclass sets them and its `unet`): moved together, without
    a progress bar or a diffusers config of its own."""

    transformer: torch.nn.Module

    def __init__(self) -> None:
        self.config: dict = {}

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device: torch.device) -> PartsPipeline:
        for name in MODELS:
            if (model := getattr(self, name, None)) is not None:
                model.to(device)
        return self

    def set_progress_bar_config(self, **_: Any) -> None:
        return None
