"""A single-file layout's Linears as row blocks of the canonical targets, and the map of every name a file may
spell a target or such a Linear by.

A family whose single files name or fuse modules otherwise than diffusers (BFL's `img_attn.qkv`, ComfyUI's
`attention.qkv`) lists each of those Linears with the targets whose weights make its rows, in order
(`FusedModule`). `lora.fused` reads and writes LoRAs through that list exactly; the checkpoint layouts convert
and merge through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from adapterzoo.formats.model.targets import TRANSFORMER, FusedModule, Target


def layout_module(targets: dict[str, Target], name: str, paths: Sequence[str], swap: bool = False
                  ) -> FusedModule | None:
    """The Linear `name` whose rows are the weights of `paths` in order; None if a path is not a target.
    `swap`: one target stored with its two row halves traded (BFL's (shift, scale) against diffusers' (scale, shift))."""
    if any(path not in targets for path in paths):
        return None
    rows, parts = 0, []
    for path in paths:
        height = targets[path].shape[0]
        parts.append((path, ((rows, rows + height),)))
        rows += height
    if swap:
        half = rows // 2
        parts = [(paths[0], ((half, rows), (0, half)))]
    return FusedModule(name, (rows, targets[paths[0]].shape[1]), tuple(parts))


class LayoutBuilder:
    """A layout's Linears in its order, each named with the transformer-relative paths of its parts; a Linear
    whose parts the model lacks (guidance_in of a schnell) is left out."""

    def __init__(self, targets: dict[str, Target]) -> None:
        self.targets = targets
        self.modules: list[FusedModule] = []

    def add(self, name: str, *rels: str, swap: bool = False) -> None:
        paths = [f"{TRANSFORMER}.{rel}" for rel in rels]
        if (module := layout_module(self.targets, name, paths, swap)) is not None:
            self.modules.append(module)

    def blocks(self, rel: str) -> list[int]:
        """The numbers of the transformer's blocks under `rel` (`transformer_blocks`)."""
        return block_indices(self.targets, f"{TRANSFORMER}.{rel}")


def block_indices(targets: Iterable[str], prefix: str) -> list[int]:
    """The block numbers under `prefix` (`transformer.transformer_blocks`) among target paths, in order."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m[1]) for path in targets if (m := pattern.match(path))})


def block_count(keys: Iterable[str], root: str) -> int:
    """How many blocks `root` (`double_blocks.`) numbers among keys without their prefix."""
    return len({k[len(root):].split(".")[0] for k in keys if k.startswith(root)})


class Spellings:
    """Every name a file may spell a target or a layout Linear by: `aliases` (name -> target path) and `fused`
    (name -> the Linear whose rows several targets share). One name never spells two things."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.fused: dict[str, FusedModule] = {}

    def alias(self, name: str, path: str) -> None:
        if self.aliases.setdefault(name, path) != path:
            raise ValueError(f"{name} spells both {self.aliases[name]} and {path}")

    def layout(self, module: FusedModule, names: Iterable[str]) -> None:
        """A layout Linear under each of `names`: the target itself when it is one target renamed."""
        for name in names:
            if module.fused:
                self.fused[name] = module
            else:
                self.alias(name, module.parts[0][0])
