"""The modules a LoRA can change (`Target`) and an architecture's map from every spelling to one of them.

Flattened kohya names cannot be un-flattened by string rules (`to_q`, `transformer_blocks`), so each
family generates the names a file may use from the real module list of its model and looks them up
(FORMATS.md §1.2; what kohya, A1111 and ComfyUI do). A name may also spell a *fused* module: one weight
of another layout (BFL's qkv) whose rows are pieces of several targets; `FusedModule` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNET = "unet"
TRANSFORMER = "transformer"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

Rows = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class KohyaConvention:
    """How kohya-family files name modules for one base: prefixes per component, denoiser spelling."""

    prefixes: dict[str, tuple[str, ...]]  # component -> prefixes accepted on read; the first is written
    unet_naming: str  # "diffusers", "ldm" (the UNet by its single-file names) or another family's own layout


@dataclass(frozen=True)
class Target:
    """One module a LoRA can change."""

    path: str  # canonical: component prefix + diffusers path, text encoders without `text_model.`
    component: str
    module_path: str  # as the component's own model names it (what PEFT and diffusers key on)
    ldm_path: str | None  # UNet modules: the LDM spelling (FORMATS.md §2.1)
    shape: tuple[int, ...]  # the module's weight: 2-D Linear, 4-D Conv2d, 1-D norm


@dataclass(frozen=True)
class FusedModule:
    """One Linear of another layout whose weight rows belong to several targets (or one target renamed)."""

    name: str  # its path in that layout: double_blocks.0.img_attn.qkv
    shape: tuple[int, int]  # its weight [out, in]
    parts: tuple[tuple[str, Rows], ...]  # target path -> the fused rows that make its rows, in its row order

    @property
    def fused(self) -> bool:
        """Whether the weight is anything but one target's weight under another name."""
        return len(self.parts) > 1 or self.parts[0][1] != ((0, self.shape[0]),)


@dataclass(frozen=True)
class Architecture:
    """Targets in module order plus a map from every accepted spelling to a canonical path, and from every
    spelling of a fused module to it."""

    base: str
    targets: dict[str, Target]
    aliases: dict[str, str]
    convention: KohyaConvention
    fused: dict[str, FusedModule] = field(default_factory=dict)
    variant: str | None = None  # the member of the family these targets are sized for, where members differ

    def resolve(self, name: str) -> Target | None:
        path = self.aliases.get(name)
        return None if path is None else self.targets[path]

    def kohya_name(self, target: Target) -> str:
        """The flattened name kohya's trainer would write for this base."""
        prefix = self.convention.prefixes[target.component][0]
        if target.component == UNET:
            ldm = self.convention.unet_naming == "ldm" and target.ldm_path
            spelled = target.ldm_path if ldm else target.module_path
        elif target.component == TRANSFORMER:
            spelled = target.module_path
        else:
            spelled = "text_model." + relative(target)
        return f"{prefix}_{flatten(spelled)}"


def flatten(path: str) -> str:
    return path.replace(".", "_")


def relative(target: Target) -> str:
    """The canonical path without its component prefix."""
    return target.path[len(target.component) + 1:]
