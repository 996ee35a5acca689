"""The canonical in-memory form of every LoRA-family file (DESIGN.md formats/, FORMATS.md §1.1, §1.4).

Keys are target module paths in diffusers naming with a component prefix (`unet.`, `text_encoder.`,
`text_encoder_2.`, `transformer.`); text-encoder paths carry no `text_model.` level. Factors are
stored as read (no scale folded in) and shaped like the target layer: 2-D for a Linear, 4-D for a
Conv2d. Every module type answers `delta(weight)`, the change it makes to the target weight at
multiplier 1, so `W' = W + m · delta(W)` holds for all of them (DoRA and IA3 need W). All but IA3
also answer `scaled_delta()`: scale · ΔW before any DoRA normalisation, which needs no W.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapterzoo.formats.model.targets import Architecture


def _tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """LyCORIS `rebuild_tucker`: core [r, r, k, k], out_factor [r, out], in_factor [r, in] -> [out, in, k, k].
    Contiguous: einsum may answer with permuted strides, which torch.kron cannot view."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, out_factor, in_factor).contiguous()


def dora_on_output(dora_scale: torch.Tensor) -> bool:
    """[out, 1(, 1, 1)] scales output rows (LyCORIS wd_on_out, PEFT); [1, in(, 1, 1)] input columns."""
    return dora_scale.shape[1] == 1


def _dora(weight: torch.Tensor, scaled_delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """W' - W for DoRA: W' = dora_scale · (W + ΔW) / ‖W + ΔW‖, the norm taken along dora_scale's axis."""
    merged = weight.float() + scaled_delta
    if dora_on_output(dora_scale):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    return dora_scale.float() * merged / norm.reshape(dora_scale.shape) - weight.float()


def _with_dora(
    shape: tuple[int, ...], scaled: torch.Tensor, dora_scale: torch.Tensor | None, weight: torch.Tensor | None
) -> torch.Tensor:
    if dora_scale is None:
        return scaled
    if weight is None:
        raise ValueError("a DoRA module's delta depends on the base weight; pass it")
    return _dora(weight.reshape(shape), scaled, dora_scale)


@dataclass
class LoraModule:
    """Plain LoRA / LoCon: ΔW = (alpha / r) · up @ down, r = down.shape[0]; optional Tucker mid, DoRA."""

    down: torch.Tensor  # [r, in] or [r, in, k, k] (or [r, in, 1, 1] with mid)
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float
    shape: tuple[int, ...]  # the target weight's shape
    mid: torch.Tensor | None = None  # Tucker core [r, r, k, k]
    dora_scale: torch.Tensor | None = None  # [out, 1(, 1, 1)] or [1, in(, 1, 1)]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def full_down(self) -> torch.Tensor:
        """The down factor with any Tucker core folded in (exact): [r, in, k, k] for convs."""
        if self.mid is None:
            return self.down
        return torch.einsum("a b h w, b i -> a i h w", self.mid.float(), self.down.float().flatten(1)).to(
            self.down.dtype
        )

    def scaled_delta(self) -> torch.Tensor:
        up = self.up.float().flatten(1)
        down = self.full_down().float().flatten(1)
        return (up @ down).reshape(self.shape) * self.scale

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return _with_dora(self.shape, self.scaled_delta(), self.dora_scale, weight)


@dataclass
class LohaModule:
    """LyCORIS LoHa: ΔW = (alpha / r) · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), Tucker cores t1/t2 optional."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    shape: tuple[int, ...]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    def _product(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if t is not None:
            return _tucker(t.float(), a.float(), b.float())
        return a.float() @ b.float()

    def scaled_delta(self) -> torch.Tensor:
        product = self._product(self.w1_a, self.w1_b, self.t1) * self._product(self.w2_a, self.w2_b, self.t2)
        return product.reshape(self.shape) * (self.alpha / self.rank)

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return _with_dora(self.shape, self.scaled_delta(), self.dora_scale, weight)


@dataclass
class LokrModule:
    """LyCORIS LoKr: ΔW = scale · kron(w1, w2); each factor full or a product, w2 optionally Tucker.

    scale = alpha / r with r the inner size of a decomposed factor; both factors full ⇒ scale 1.
    A conv's factors are 2-D (w2 [b, d·k·k], or w1 and w2 sharing the kernel in early LyCORIS files) or
    w2 is 4-D [b, d, k, k]; either way kron(w1, w2) holds the weight's elements in its order.
    """

    alpha: float
    shape: tuple[int, ...]
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        for factor in (self.w1_b, self.w2_b):
            if factor is not None:
                return int(factor.shape[0])
        return None

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    def scaled_delta(self) -> torch.Tensor:
        w1 = (self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()).flatten(1)
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _tucker(self.t2.float(), self.w2_a.float(), self.w2_b.float())
        else:
            w2 = self.w2_a.float() @ self.w2_b.float()
        if w2.dim() == 4:  # a conv's w2 kept 4-D (full or Tucker): w1 scales whole kernels
            w1 = w1[:, :, None, None]
        # else A1111's and ComfyUI's rule: kron of the 2-D factors, reshaped to the weight. For a conv this
        # also reads files of early LyCORIS that split the kernel between both factors (w1 20×60, w2 16×48).
        return torch.kron(w1, w2).reshape(self.shape) * self.scale

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return _with_dora(self.shape, self.scaled_delta(), self.dora_scale, weight)


@dataclass
class Ia3Module:
    """LyCORIS IA3: W' = W ⊙ (1 + m·w) along output rows, or input columns when on_input."""

    weight: torch.Tensor  # [out] or [in]
    on_input: bool
    shape: tuple[int, ...]

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise ValueError("an IA3 module scales the base weight; its delta needs that weight")
        view = [1] * len(self.shape)
        view[1 if self.on_input else 0] = -1
        return weight.float().reshape(self.shape) * self.weight.float().reshape(view)


@dataclass
class FullModule:
    """LyCORIS full / norm module: W' = W + diff (and bias' = bias + diff_b); alpha plays no part."""

    diff: torch.Tensor
    shape: tuple[int, ...]
    diff_b: torch.Tensor | None = None

    def scaled_delta(self) -> torch.Tensor:
        return self.diff.float().reshape(self.shape)

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scaled_delta()


AdapterModule = LoraModule | LohaModule | LokrModule | Ia3Module | FullModule


@dataclass
class LoraFile:
    """One adapter file in canonical form: modules by target path, plus what travels with them."""

    modules: dict[str, AdapterModule]
    architecture: Architecture
    source_format: str  # DESIGN.md vocabulary: kohya, kohya-ldm, diffusers, diffusers-legacy, peft, ...
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # cloneofsimo's embedded tokens

    @property
    def base(self) -> str:
        return self.architecture.base

    def components(self) -> dict[str, int]:
        """Modules per component (unet, text_encoder, ...), in architecture order."""
        counts: dict[str, int] = {}
        for path in self.modules:
            component = self.architecture.targets[path].component
            counts[component] = counts.get(component, 0) + 1
        return counts

