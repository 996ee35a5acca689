"""The reference ΔW of a kohya state dict, in plain torch straight from FORMATS.md §1.1 (never adapterzoo code),
for tests to compare what the ops write against."""

from __future__ import annotations

import torch


def kohya_deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> alpha / r · ΔW as a float64 [out, in·k·k] matrix, r = down.shape[0] and a missing alpha = r.

    ΔW = up @ down for linears and convs (1x1 and kxk: up [out, r, 1, 1], down [r, in, k, k]); a Tucker LoCon
    goes through its mid [r, r, k, k] between 1x1 down and up.
    """
    out = {}
    for key, tensor in sd.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down, up = tensor.double(), sd[f"{name}.lora_up.weight"].double()
        rank = down.shape[0]
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else rank
        up2 = up.reshape(up.shape[0], rank)
        if f"{name}.lora_mid.weight" in sd:
            mid = sd[f"{name}.lora_mid.weight"].double()
            delta = torch.einsum("oa,abhw,bi->oihw", up2, mid, down.reshape(rank, -1)).reshape(up.shape[0], -1)
        else:
            delta = up2 @ down.reshape(rank, -1)
        out[name] = delta * alpha / rank
    return out
