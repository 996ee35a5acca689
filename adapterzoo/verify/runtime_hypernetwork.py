"""Apply an A1111 hypernetwork at run time (FORMATS.md §3, SAMPLING.md §2).

In every attention of the UNet the context that feeds `to_k` / `to_v` (the text states for attn2,
the block's own states for attn1) becomes context + m·f(context), f the stored k or v network picked
by the context's width; widths without a pair pass through. Pre-hooks on `to_k` and `to_v` do it, so
no weight is touched, `multiplier` may change between steps, and each attention's calls are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapterzoo.errors import BadFileError
from adapterzoo.formats.hypernetwork_convert import OLD_KEYS, Hypernetwork, a1111_fields, expected_shapes

# A1111's activation names; anything else is a lowercased torch.nn class name (FORMATS.md §3).
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "leakyrelu": F.leaky_relu, "elu": F.elu, "swish": F.hardswish, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}
_NO_ACTIVATION = (None, "linear")


def _activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if name in _NO_ACTIVATION:
        return None
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    for attr in dir(torch.nn):
        if attr.lower() == str(name).lower() and isinstance(getattr(torch.nn, attr), type):
            return getattr(torch.nn, attr)()
    raise BadFileError(f"hypernetwork activation {name!r} is neither an A1111 name nor a torch.nn class")


class _Network:
    """One k or v network: Linear (+ activation) (+ LayerNorm) per layer, dropout off (inference)."""

    def __init__(self, width: int, module: dict[str, torch.Tensor], fields: dict) -> None:
        module = {OLD_KEYS.get(k, k): v for k, v in module.items()}
        expected = expected_shapes(width, fields)
        found = {k: tuple(v.shape) for k, v in module.items()}
        if found != expected:
            raise BadFileError(f"hypernetwork width {width}: tensors do not fit its layer_structure "
                               f"{fields['layer_structure']} (A1111 could not load it)")
        self.layers: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        indices = sorted({int(k.split(".")[1]) for k in module})
        for index in indices:
            weight, bias = module[f"linear.{index}.weight"], module[f"linear.{index}.bias"]
            self.layers.append(("linear" if weight.dim() == 2 else "norm", weight, bias))
        self.activation = _activation(fields["activation_func"])
        self.activate_output = bool(fields["activate_output"])

    def to(self, device: torch.device, dtype: torch.dtype) -> _Network:
        self.layers = [(kind, w.to(device, dtype), b.to(device, dtype)) for kind, w, b in self.layers]
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linears = sum(kind == "linear" for kind, _, _ in self.layers)
        seen = 0
        for kind, weight, bias in self.layers:
            if kind == "linear":
                x = F.linear(x, weight, bias)
                seen += 1
                if self.activation is not None and (seen < linears or self.activate_output):
                    x = self.activation(x)
            else:
                x = F.layer_norm(x, weight.shape, weight, bias)
        return x


@dataclass
class AppliedHypernetwork:
    multiplier: float = 1.0
    calls: dict[str, int] = field(default_factory=dict)  # attention path -> calls whose width had a pair
    _handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def attention_widths(unet: torch.nn.Module) -> dict[str, int]:
    """Every attention of the UNet (path -> the width of the context its to_k reads)."""
    return {name: module.to_k.in_features for name, module in unet.named_modules()
            if hasattr(module, "to_k") and hasattr(module, "to_v") and isinstance(module.to_k, torch.nn.Linear)}


def apply_hypernetwork(hypernetwork: Hypernetwork, unet: torch.nn.Module, multiplier: float = 1.0
                       ) -> AppliedHypernetwork:
    """Hook every attention whose context width the file has a (k, v) pair for."""
    fields, _ = a1111_fields(hypernetwork.fields, str(hypernetwork.fields.get("name") or ""))
    weight = next(unet.parameters())
    networks = {width: tuple(_Network(width, m, fields).to(weight.device, weight.dtype) for m in pair)
                for width, pair in hypernetwork.layers.items()}
    applied = AppliedHypernetwork(multiplier)
    for path, width in attention_widths(unet).items():
        if width not in networks:
            continue
        attention = unet.get_submodule(path)
        applied.calls[path] = 0
        for side, projection in enumerate((attention.to_k, attention.to_v)):
            network = networks[width][side]

            def pre_hook(mod, inputs, path=path, network=network, counts=side == 0):
                if counts:
                    applied.calls[path] += 1
                if applied.multiplier == 0:
                    return None
                context = inputs[0]
                return (context + network(context) * applied.multiplier, *inputs[1:])

            applied._handles.append(projection.register_forward_pre_hook(pre_hook))
    return applied
