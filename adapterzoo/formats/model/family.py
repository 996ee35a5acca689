"""What a model family declares about itself (formats/families/ holds one module per family).

The dispatchers (probe, LoRA read and write, checkpoint conversion and targets, sources, verify) ask the
registered families through this interface and name none of them. Everything here is plain data and
functions: a family keeps torch, diffusers and transformers behind imports inside its functions, so
recognising a file from its header never loads them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from adapterzoo.formats.io.probe_result import ProbeResult
    from adapterzoo.formats.io.safetensors_writer import PlannedTensor
    from adapterzoo.formats.io.tensor_source import TensorSource
    from adapterzoo.formats.io.tensor_table import TensorTable
    from adapterzoo.formats.model.module_tables import ModuleTable
    from adapterzoo.formats.model.targets import Architecture
    from adapterzoo.formats.model.weight_locations import CheckpointTargets

LoraModules = dict[str, dict[str, str]]  # module as a file spells it -> {part: key}
# an embedding's slot -> the pipeline's text encoder its vectors go to: one unnamed part (A1111, kohya SD1/SD2,
# diffusers) to the first encoder, kohya's SDXL pair to both CLIPs (FORMATS.md §4)
CLIP_EMBEDDING_SLOTS = {"text_encoder": "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}


def _nothing(*_: Any) -> None:
    return None


def lazy(module: str, attribute: str) -> Callable[..., Any]:
    """`module`'s `attribute` (a dotted path: `LAYOUT.targets`), imported at its first call, so a family's
    declaration stays as light as its recognisers while its heavy parts live beside it."""
    def call(*args: Any) -> Any:
        found: Any = importlib.import_module(module)
        for name in attribute.split("."):
            found = getattr(found, name)
        return found(*args)

    return call


@dataclass(frozen=True)
class Dialect:
    """A key spelling only this family's LoRAs use (ComfyUI/BFL `diffusion_model.` names, XLabs slots)."""

    name: str  # the format word probe answers: bfl, xlabs
    speaks: Callable[[list[str]], bool]  # whether a file's keys are in this dialect
    split: Callable[[str], tuple[str, str] | None]  # key -> (module as spelled, part), None for no LoRA key


@dataclass(frozen=True)
class Checkpoints:
    """How the family's checkpoints lie on disk: which it converts and where each LoRA target's weight lives.
    Every field is optional; what a family leaves out is refused by the dispatcher in one line."""

    file_base: Callable[[TensorTable], str | None] | None = None  # a whole single file of the family's, its base
    owns_folder: Callable[[Path], bool] | None = None  # a diffusers folder of the family's
    folder_base: Callable[[Path], str] | None = None  # the base of a folder it owns
    to_single_file: Callable[[Path, torch.dtype | None], tuple[str, list[PlannedTensor], list[str]]] | None = None
    to_folder: Callable[[TensorSource, torch.dtype | None, Path], dict] | None = None  # a single file -> folder
    # a single file -> (base, diffusers pipeline) in memory, in the dtype given: what verify and sample load
    to_pipeline: Callable[[TensorSource, torch.dtype], tuple[str, Any]] | None = None
    # a folder (source None) or an opened single file -> its LoRA targets; None: not the family's checkpoint
    targets: Callable[[Path, TensorSource | None], CheckpointTargets | None] | None = None


def layout_checkpoints(base: str, prefix: Callable[[TensorTable], str | None], module: str,
                       targets: str = "LAYOUT.targets") -> Checkpoints:
    """The checkpoints of a transformer family whose single files and folders one `SingleFileLayout` converts and
    locates (`module`'s `LAYOUT`, imported at first use): a file is the family's where `prefix` finds its
    transformer; `targets` may name a function of `module` in the layout's stead."""
    return Checkpoints(
        file_base=lambda table: base if prefix(table) is not None else None,
        owns_folder=lazy(module, "LAYOUT.owns_folder"),
        folder_base=lambda folder: base,
        to_single_file=lazy(module, "LAYOUT.folder_to_file"),
        to_folder=lazy(module, "LAYOUT.file_to_folder"),
        targets=lazy(module, targets),
    )


@dataclass(frozen=True)
class Sampling:
    """What verify and sample need to render the family's bases. What `assemble` returns may declare
    `default_steps` (when the user gives no --steps) and `guidance` (what is recorded for a model without
    classifier-free guidance, whose denoiser says `cfg = False`: `{"distilled_guidance": 3.5}` or
    `{"guidance": "none"}`); its denoiser may declare `patch` (latent patches packed per token, side) and
    `cfg_scale` (a CFG model's own scale, where it is not verify's 7: Chroma's 5, Z-Image Base's 5) and
    `combine(uncond, cond, scale)` (where its pipeline adjusts the guided prediction: Qwen-Image's renorm)."""

    bases: tuple[str, ...]  # the bases verify renders
    vae_fp32: tuple[str, ...] = ()  # bases whose VAE overflows in fp16: kept in fp32 unless fp16 is asked for by name
    vae_fp16_black: str = ""  # what to tell a user whose fp16 decode of such a VAE came out black
    # a pipeline put together from its parts (a DiT family): component -> (library, class) when a folder's
    # model_index.json does not say; empty: DiffusionPipeline loads a whole folder, a single file is converted
    parts: dict[str, tuple[str, str]] = field(default_factory=dict)
    optional: dict[str, tuple[str, str]] = field(default_factory=dict)  # parts loaded when present (SD3's T5)
    # the width of each text-encoder slot that shares its class with another (SD3's two CLIPs), so that a lone
    # file given with --text-encoders finds its slot
    part_widths: dict[str, int] = field(default_factory=dict)
    # what a lone VAE file in LDM names cannot say: latent scaling and shift, sample size
    vae_config: dict[str, Any] = field(default_factory=dict)
    # the scheduler when no folder gives one (a single file and lone parts): the loaded transformer -> scheduler
    scheduler: Callable[[Any], Any] | None = None
    transformer_from_file: Callable[[Path, torch.dtype], Any] | None = None  # a single file's DiT, in memory
    assemble: Callable[[dict[str, Any]], Any] | None = None  # the parts -> what verify's loop renders with
    # the sigmas the family's pipeline hands a flow-matching scheduler for N steps (FluxPipeline: linspace(1, 1/N));
    # None: the scheduler spaces its own timesteps (StableDiffusion3Pipeline)
    flow_sigmas: Callable[[int], Any] | None = None
    # the dynamic shift's mu for (the loop's latent shape, steps) where the family's pipeline computes its own
    # (Flux.2's empirical mu); None: the scheduler config's line from base_shift to max_shift over the image tokens
    flow_mu: Callable[[tuple[int, ...], int], float] | None = None
    # the loaded transformer -> why this member is not rendered (a text encoder no path here reads), or None;
    # asked before the other parts load
    refuse: Callable[[Any], str | None] | None = None
    # an embedding's slot (FORMATS.md §4: clip_l, clip_g, t5xxl) -> the text encoder its vectors act on, each
    # through that encoder's own tokenizer (text_encoder_N reads tokenizer_N); a slot not named lands nowhere
    embedding_slots: dict[str, str] = field(default_factory=lambda: dict(CLIP_EMBEDDING_SLOTS))


@dataclass(frozen=True)
class Family:
    """One model family: how to recognise its files, its module tables and dialects, its checkpoint layouts.

    Only `name`, `title`, `bases` and `order` are required; each other field defaults to "this family has
    none", so a new family starts with detection and grows a field at a time.
    """

    name: str  # the module's name under formats/families/
    title: str  # what people call it, in messages: "Flux", "Stable Diffusion 1/2/XL"
    bases: tuple[str, ...]  # the `base` words probe answers for it
    order: int  # detection runs in this order, lower first: a family whose names overlap another's goes first

    # -- recognising files from names and shapes (plain Python on a header) --
    lora_base: Callable[[LoraModules, TensorTable], str | None] = _nothing  # from module names and factor shapes
    # the base whose model a LoRA's modules fit as well by name and shape, when another family claimed it first
    lora_fits: Callable[[LoraModules, TensorTable], str | None] = _nothing
    metadata_base: Callable[[dict[str, str]], str | None] = _nothing  # kohya/ModelSpec hints, used when shapes fail
    describe_lora: Callable[[LoraModules, TensorTable, ProbeResult], None] = _nothing  # details probe adds (coverage, variant)
    # `details` facts naming a member that the weights cannot tell from another (the same tensor names and shapes),
    # read from a file name or metadata, each with where in `details["read_from"]`; merge and merge-loras refuse
    # files that declare different values of one (`formats.members`)
    unconfirmed_members: tuple[str, ...] = ()
    dialects: tuple[Dialect, ...] = ()
    probe_checkpoint: Callable[[TensorTable, ProbeResult], bool] = lambda table, result: False  # fills kind, base
    pipeline_base: Callable[[str, dict], str | None] = _nothing  # diffusers folder: pipeline class, UNet/DiT config
    describe_folder: Callable[[dict, ProbeResult], None] = _nothing  # details from a folder's UNet/DiT config (variant)
    vae_latents: dict[int, str] = field(default_factory=dict)  # a lone VAE's latent channels -> base
    embedding_base: Callable[[dict[str, int]], str | None] = _nothing  # text-encoder slot ("" if unnamed) -> width
    hypernetwork_base: Callable[[list[int]], str | None] = _nothing  # an A1111 hypernetwork's context widths

    # -- module tables, trainer dialects, fused <-> split rules (may import torch inside) --
    architecture: Callable[[str, str | None], Architecture] | None = None  # real-size targets of a base (and variant)
    architecture_from_tables: Callable[[str, dict[str, ModuleTable]], Architecture] | None = None  # any size
    # a dialect this family writes in its own module space (bfl): LoraFile -> tensors
    lora_writers: dict[str, Callable[[Any], dict[str, torch.Tensor]]] = field(default_factory=dict)
    lora_refusal: Callable[[LoraModules], str | None] = _nothing  # why a LoRA is not additive, refused on read
    modelspec_architecture: Callable[[Architecture, dict[str, str]], str] | None = None  # ModelSpec id of a LoRA

    # -- checkpoints, sources, sampling --
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    civitai_base_models: dict[str, tuple[str, ...]] = field(default_factory=dict)  # base -> Civitai baseModel labels
    # Civitai label -> what its files' probe details must say (SDXL's family, SD3.5's variant), to check it against
    civitai_details: dict[str, dict[str, str]] = field(default_factory=dict)
    hub_hints: tuple[tuple[str, str], ...] = ()  # (word in a Hub base_model tag, base), tried in order
    sampling: Sampling | None = None
