"""Where each LoRA target's weight lives inside a checkpoint (`WeightLocation`), and a checkpoint's targets with
those places (`CheckpointTargets`): what `merge` writes into and `extract` reads, whatever the family's layout.
A stored tensor may hold a target whole, as a row block of a fused weight (OpenCLIP's `in_proj`, BFL's `qkv`),
transposed, or with its two row halves swapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from adapterzoo.errors import BadFileError
from adapterzoo.formats.io.tensor_source import TensorSource
from adapterzoo.formats.model.clip_names import strip_text_model
from adapterzoo.formats.model.targets import TRANSFORMER, UNET, Architecture

SINGLE_FILE = ""  # WeightLocation.file of every tensor of a single-file checkpoint
WEIGHT_STEMS = {UNET: "diffusion_pytorch_model", TRANSFORMER: "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}


@dataclass(frozen=True)
class WeightLocation:
    """The stored tensor that holds one target's weight (and bias), and how the target sits in it."""

    file: str  # component folder ("unet", "text_encoder", ...) of a pipeline folder; SINGLE_FILE otherwise
    key: str  # the weight tensor's key in that file
    bias: str | None = None  # the bias tensor's key, if the module has one stored
    rows: tuple[int, int] | None = None  # [start, stop) rows of a fused OpenCLIP in_proj weight and bias
    transposed: bool = False  # stored as the transpose of the module's weight (OpenCLIP text_projection)
    halves_swapped: bool = False  # stored with its two row halves swapped (Flux's final modulation in BFL)

    def region(self, stored: torch.Tensor) -> torch.Tensor:
        """The part of the stored weight (or bias) tensor that is this target's: a view of it."""
        return stored if self.rows is None else stored[self.rows[0]:self.rows[1]]

    def as_module(self, region: torch.Tensor) -> torch.Tensor:
        """The region laid out as the module holds it; a view when nothing moves, else a copy."""
        if self.halves_swapped:
            region = torch.cat(region.chunk(2)[::-1])
        return region.t().contiguous() if self.transposed else region

    def as_stored(self, module: torch.Tensor) -> torch.Tensor:
        """The inverse of `as_module` (both moves are their own inverse)."""
        if self.transposed:
            module = module.t()
        return torch.cat(module.chunk(2)[::-1]) if self.halves_swapped else module

    @property
    def moved(self) -> bool:
        """Whether `as_module` copies, so a change to it must be written back with `as_stored`."""
        return self.transposed or self.halves_swapped


@dataclass
class CheckpointTargets:
    """A checkpoint's LoRA targets (`architecture`) and, for each, where its weight is stored."""

    path: Path
    base: str
    is_folder: bool
    architecture: Architecture
    locations: dict[str, WeightLocation]  # canonical target path -> where its weight lives
    sources: dict[str, TensorSource]  # WeightLocation.file -> lazily read tensors

    def weight(self, target: str) -> torch.Tensor:
        """The target's weight as its module holds it (shape and layout), in the stored dtype."""
        location = self.locations[target]
        tensor = location.as_module(location.region(self.sources[location.file].get(location.key)))
        return tensor.reshape(self.architecture.targets[target].shape)

    def bias(self, target: str) -> torch.Tensor | None:
        """The target's bias as its module holds it, or None if none is stored."""
        location = self.locations[target]
        if location.bias is None:
            return None
        return location.as_module(location.region(self.sources[location.file].get(location.bias)))

    @property
    def components(self) -> set[str]:
        """The model parts LoRAs can land on: {"unet"} for a UNet alone."""
        return {target.component for target in self.architecture.targets.values()}

    def by_key(self, file: str) -> dict[str, list[str]]:
        """Stored weight or bias key of `file` -> the targets living in it (q, k and v share an in_proj)."""
        out: dict[str, list[str]] = {}
        for target, location in self.locations.items():
            if location.file == file:
                out.setdefault(location.key, []).append(target)
                if location.bias is not None:
                    out.setdefault(location.bias, []).append(target)
        return out


def diffusers_locations(architecture: Architecture, sources: dict[str, TensorSource], file: str | None = None
                        ) -> dict[str, WeightLocation]:
    """Each target's weight in its component's diffusers-keyed tensors; `file` names where they live if not
    in the component's own folder."""
    stripped = {c: {strip_text_model(k): k for k in s.shapes} for c, s in sources.items() if c != UNET}
    locations = {}
    for target in architecture.targets.values():
        if target.component not in sources:  # a text encoder the model on disk lacks (Flux's built-in CLIP-L)
            continue
        source, stored = sources[target.component], stripped.get(target.component)
        key = stored_key(source, target.module_path + ".weight", stored)
        if key is not None:
            bias = stored_key(source, target.module_path + ".bias", stored)
            location = WeightLocation(target.component if file is None else file, key, bias)
            locations[target.path] = checked(location, source, target.shape)
    return locations


def stored_key(source: TensorSource, name: str, by_stripped: dict[str, str] | None) -> str | None:
    """The key holding `name`: as spelled, or (text encoders) with or without transformers' `text_model.`."""
    if name in source.shapes:
        return name
    return None if by_stripped is None else by_stripped.get(strip_text_model(name))


def checked(location: WeightLocation, source: TensorSource, shape: tuple[int, ...]) -> WeightLocation:
    stored = source.shapes[location.key]
    rows = stored[0] if location.rows is None else location.rows[1] - location.rows[0]
    numel = rows * int(torch.Size(stored[1:]).numel()) if stored else 1
    if numel != int(torch.Size(shape).numel()):
        raise BadFileError(f"{location.key} is {list(stored)}, which cannot hold a {list(shape)} module weight")
    return location
