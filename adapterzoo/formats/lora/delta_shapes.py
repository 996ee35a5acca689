"""Whether a canonical module's factors form its target's change, worked out from their shapes alone.

Factors that fit the target on the outside but not each other inside are a broken file, which the reader
says in one line before anything is computed. Forming ΔW on torch's meta device would say the same, but
its first use imports torch's symbolic-shape and compiler machinery (sympy, dynamo: 2–4 s of start-up)
for what is arithmetic on a few tuples. The rules follow `lora_model`'s formulas, operation by operation.
"""

from __future__ import annotations

import math

import torch

from adapterzoo.formats.lora.lora_model import AdapterModule, LohaModule, LokrModule, LoraModule

Shape = tuple[int, ...]


class ShapeMismatch(ValueError):
    """An operation of the module's ΔW formula that its factors' shapes do not allow."""


def _shape(t: torch.Tensor) -> Shape:
    return tuple(t.shape)


def _flat(shape: Shape) -> Shape:
    return (shape[0], math.prod(shape[1:]))


def _matmul(a: Shape, b: Shape) -> Shape:
    if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
        raise ShapeMismatch(f"{list(a)} @ {list(b)}")
    return a[0], b[1]


def _tucker(core: Shape, outer: Shape, inner: Shape) -> Shape:
    """rebuild_tucker: core [i, j, ...], outer [i, p], inner [j, r] -> [p, r, ...]."""
    if len(core) < 2 or len(outer) != 2 or len(inner) != 2 or (core[0], core[1]) != (outer[0], inner[0]):
        raise ShapeMismatch(f"Tucker core {list(core)} with {list(outer)} and {list(inner)}")
    return (outer[1], inner[1], *core[2:])


def _kron(a: Shape, b: Shape) -> Shape:
    """torch.kron: the shorter shape padded with leading 1s, sizes multiplied."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    return tuple(x * y for x, y in zip(a, b))


def _reshaped(shape: Shape, target: Shape) -> Shape:
    if math.prod(shape) != math.prod(target):
        raise ShapeMismatch(f"{list(shape)} into {list(target)}")
    return target


def _lora(m: LoraModule) -> Shape:
    down = _shape(m.down)
    if m.mid is not None:  # full_down: einsum "abhw,bi->aihw"
        mid, flat = _shape(m.mid), _flat(down)
        if len(mid) != 4 or mid[1] != flat[0]:
            raise ShapeMismatch(f"Tucker core {list(mid)} with {list(down)}")
        down = (mid[0], flat[1], *mid[2:])
    return _reshaped(_matmul(_flat(_shape(m.up)), _flat(down)), m.shape)


def _loha_half(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> Shape:
    return _tucker(_shape(t), _shape(a), _shape(b)) if t is not None else _matmul(_shape(a), _shape(b))


def _loha(m: LohaModule) -> Shape:
    first, second = _loha_half(m.w1_a, m.w1_b, m.t1), _loha_half(m.w2_a, m.w2_b, m.t2)
    if first != second:
        raise ShapeMismatch(f"{list(first)} ⊙ {list(second)}")
    return _reshaped(first, m.shape)


def _lokr(m: LokrModule) -> Shape:
    w1 = _flat(_shape(m.w1) if m.w1 is not None else _matmul(_shape(m.w1_a), _shape(m.w1_b)))
    if m.w2 is not None:
        w2 = _shape(m.w2)
    elif m.t2 is not None:
        w2 = _tucker(_shape(m.t2), _shape(m.w2_a), _shape(m.w2_b))
    else:
        w2 = _matmul(_shape(m.w2_a), _shape(m.w2_b))
    if len(w2) == 4:
        w1 = (*w1, 1, 1)
    return _reshaped(_kron(w1, w2), m.shape)


def check_delta_shape(module: AdapterModule) -> None:
    """Raise ShapeMismatch naming the first operation of ΔW the factors' shapes do not allow, ZeroDivisionError
    for a rank-0 module (its scale alpha / r); IA3 and full modules are checked whole by the reader."""
    if isinstance(module, LoraModule):
        _ = module.scale
        _lora(module)
    elif isinstance(module, LohaModule):
        _ = module.alpha / module.rank
        _loha(module)
    elif isinstance(module, LokrModule):
        _ = module.scale
        _lokr(module)
