"""Build torch modules without memory for their weights, to be filled by `load_state_dict(..., assign=True)`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built here get parameters on `meta` (no memory, no init cost) and real buffers (position ids),
    which the weights do not carry."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original
