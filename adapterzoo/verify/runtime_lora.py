"""Apply a LoRA-family file at run time: forward hooks add m·(its term) to each patched module's output.

No weight of the model is copied or changed (SAMPLING.md §1). A plain LoRA / LoCon keeps its low-rank
form: m·s·B(A x), with A a conv of the layer's kernel, stride and padding and B a 1×1 conv. LoHa, LoKr,
IA3, full diffs and DoRA form their ΔW once per module (DoRA's and IA3's depend on W, FORMATS.md §1.4)
and add m·(ΔW x). The multiplier lives in the `AppliedLora` and is read on every call, so it may change
between steps at no cost; every call is counted, the honest measure of coverage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from adapterzoo.formats.lora.lora_model import AdapterModule, FullModule, LoraFile, LoraModule
from adapterzoo.formats.model.targets import Architecture

PATCHABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)


@dataclass
class _Term:
    """What one module adds at multiplier 1: a low-rank pair or a full ΔW (and a bias delta)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    scale: float = 1.0
    delta: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def live_modules(models: dict[str, torch.nn.Module], architecture: Architecture,
                 paths: list[str]) -> dict[str, torch.nn.Module | None]:
    """Canonical target path -> the layer it names in `models` (component -> model), or None."""
    found: dict[str, torch.nn.Module | None] = {}
    for path in paths:
        target = architecture.targets[path]
        model = models.get(target.component)
        module = None
        if model is not None:
            try:
                module = model.get_submodule(target.module_path)
            except AttributeError:
                module = None
        fits = isinstance(module, PATCHABLE) and tuple(module.weight.shape) == target.shape
        found[path] = module if fits else None
    return found


def _term(adapter: AdapterModule, module: torch.nn.Module) -> _Term:
    weight = module.weight
    dtype, device = weight.dtype, weight.device
    if isinstance(adapter, LoraModule) and adapter.dora_scale is None:
        # kept in the file's dtype and cast per call: an fp16 file on an fp32 model holds no fp32 copy
        return _Term(down=adapter.full_down().to(device), up=adapter.up.to(device), scale=adapter.scale)
    with torch.no_grad():
        delta = adapter.delta(weight.detach().float().cpu()).to(device, dtype)
    bias = adapter.diff_b.to(device, dtype) if isinstance(adapter, FullModule) and adapter.diff_b is not None else None
    return _Term(delta=delta, bias=bias)


def _add(term: _Term, module: torch.nn.Module, x: torch.Tensor, output: torch.Tensor, m: float) -> torch.Tensor:
    """output + m·(the term applied to the module's input x)."""
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):  # LyCORIS w_norm / b_norm
        if isinstance(module, torch.nn.LayerNorm):
            normed = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            view = term.delta.shape
        else:
            normed = F.group_norm(x, module.num_groups, eps=module.eps)
            view = (1, -1) + (1,) * (x.dim() - 2)
        out = normed * term.delta.reshape(view)
        return output + m * (out if term.bias is None else out + term.bias.reshape(view))
    if isinstance(module, torch.nn.Conv2d):
        conv = {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}
        if term.delta is not None:
            return output + m * F.conv2d(x, term.delta.reshape(module.weight.shape), term.bias, **conv)
        down = term.down.to(x.dtype).reshape(term.down.shape[0], module.weight.shape[1], *module.weight.shape[2:])
        up = term.up.to(x.dtype).reshape(*term.up.shape[:2], 1, 1)
        return output + (m * term.scale) * F.conv2d(F.conv2d(x, down, **conv), up)
    if term.delta is not None:
        return output + m * F.linear(x, term.delta.reshape(module.weight.shape), term.bias)
    # one fused multiply-add into the output: no out-sized temporaries for the scaled term
    hidden = F.linear(x, term.down.to(x.dtype).reshape(term.down.shape[0], -1))
    up = term.up.to(x.dtype).reshape(term.up.shape[0], -1)
    return torch.addmm(output.reshape(-1, up.shape[0]), hidden.reshape(-1, up.shape[1]), up.t(),
                       alpha=m * term.scale).reshape(output.shape)


@dataclass
class AppliedLora:
    """A file hooked into a pipeline; set `multiplier` at any time; `remove()` restores the model exactly."""

    multiplier: float = 1.0
    calls: dict[str, int] = field(default_factory=dict)  # canonical path -> forward calls seen
    _handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def apply_lora(lora: LoraFile, modules: dict[str, torch.nn.Module], multiplier: float = 1.0) -> AppliedLora:
    """Hook every module of `lora` found in `modules` (path -> live module); at m = 0 outputs are untouched."""
    applied = AppliedLora(multiplier)
    for path, module in modules.items():
        term = _term(lora.modules[path], module)
        applied.calls[path] = 0

        def hook(mod, inputs, output, path=path, term=term):
            applied.calls[path] += 1
            if applied.multiplier == 0:
                return None
            return _add(term, mod, inputs[0], output, applied.multiplier)

        applied._handles.append(module.register_forward_hook(hook))
    return applied
