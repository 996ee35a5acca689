"""Oracles the family tests (Flux.2, Chroma, Z-Image) share, in plain torch: ΔW of a LoRA on a single-file
layout's Linears through a row mapping each test writes out itself (never adapterzoo's tables), ΔW as diffusers'
converters and loaders read a file, and the command line as a user runs it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from cli_helpers import run
from safetensors.torch import save_file

# layout Linear -> [(diffusers module, first row, last row + 1)] in the order its rows hold them; two entries for
# one module with swapped ranges mean its halves are swapped
Mapping = dict[str, list[tuple[str, int, int]]]
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # layout name -> (down, up, alpha)


def rows(*parts: tuple[str, int]) -> list[tuple[str, int, int]]:
    """Consecutive row blocks of a fused weight: (diffusers module, rows) each."""
    out, start = [], 0
    for path, count in parts:
        out.append((path, start, start + count))
        start += count
    return out


def random_factors(shapes: dict[str, tuple[int, int]], seed: int) -> Factors:
    """A random LoRA on every named Linear ([out, in] each): ranks 2-4 and alphas 1-4 varied, factors ~0.1."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (rows_, cols)) in enumerate(shapes.items()):
        rank = 2 + i % 3
        out[name] = (torch.randn(rank, cols, generator=gen) * 0.1, torch.randn(rows_, rank, generator=gen) * 0.1,
                     float(1 + i % 4))
    return out


def layout_deltas(factors: Factors, mapping: Mapping, scaled: bool = True) -> dict[str, torch.Tensor]:
    """`transformer.<diffusers module>` -> ΔW (float64): alpha / r · up @ down of each layout Linear, its rows
    cut as `mapping` says (scale 1 when `scaled` is False: files without alpha)."""
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, alpha) in factors.items():
        delta = (alpha / down.shape[0] if scaled else 1.0) * up.double() @ down.double()
        pieces: dict[str, list[torch.Tensor]] = {}
        for path, lo, hi in mapping[name]:
            pieces.setdefault(f"transformer.{path}", []).append(delta[lo:hi])
        out.update({path: torch.cat(blocks) for path, blocks in pieces.items()})
    return out


def write_layout_lora(path: Path, factors: Factors, spell, down: str = "lora_A", up: str = "lora_B",
                      alpha: bool = False) -> Path:
    """The factors under `spell(name)` with the given part names (and alpha tensors if asked)."""
    sd = {}
    for name, (d, u, a) in factors.items():
        stem = spell(name)
        sd[f"{stem}.{down}.weight"], sd[f"{stem}.{up}.weight"] = d, u
        if alpha:
            sd[f"{stem}.alpha"] = torch.tensor(a)
    save_file(sd, str(path))
    return path


def split_factors(factors: Factors, mapping: Mapping) -> Factors:
    """The same ΔW as LoRAs on the diffusers modules (diffusers names): a fused Linear's down shared, its up cut."""
    out = {}
    for name, (down, up, alpha) in factors.items():
        parts = mapping[name]
        if len(parts) == 2 and parts[0][0] == parts[1][0]:  # swapped halves
            (path, lo1, hi1), (_, lo2, hi2) = parts
            out[path] = (down, torch.cat([up[lo1:hi1], up[lo2:hi2]]), alpha)
            continue
        for path, lo, hi in parts:
            out[path] = (down.clone(), up[lo:hi].contiguous(), alpha)
    return out


def assert_same_deltas(lora, reference: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    """Every module of a read LoraFile has the reference ΔW (relative Frobenius error below `rtol`)."""
    assert sorted(lora.modules) == sorted(reference)
    for path, expected in reference.items():
        got = lora.modules[path].delta().double().reshape(expected.shape)
        assert float((got - expected).norm() / expected.norm()) < rtol, path


def converted_deltas(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a diffusers converter made of a file (alpha baked in, `transformer.` keys): module -> B @ A (float64)."""
    return {k.removesuffix(".lora_A.weight"): state_dict[k.replace(".lora_A.", ".lora_B.")].double() @ v.double()
            for k, v in state_dict.items() if k.endswith(".lora_A.weight")}


def loaded_deltas(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], load) -> dict[str, torch.Tensor]:
    """ΔW of every module diffusers' loader (`load(state_dict, transformer)`) patched on a copy of `model`, read back
    from the PEFT layers it made: what the pipeline will add to each weight."""
    loaded = copy.deepcopy(model)
    load(dict(state_dict), loaded)
    out = {}
    for name, module in loaded.named_modules():
        if hasattr(module, "get_delta_weight") and getattr(module, "active_adapters", None):
            out[f"transformer.{name}"] = sum(module.get_delta_weight(a).detach().double() for a in module.active_adapters)
    return out


def assert_close_deltas(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 1e-6) -> None:
    assert sorted(got) == sorted(expected)
    for key, delta in expected.items():
        assert float((got[key].double() - delta).norm() / delta.norm()) < rtol, key


def cli(args: list[str], capsys, monkeypatch) -> dict:
    """`adapterzoo ARGS... --json`, which must succeed; its report."""
    code, out, err = run([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    return json.loads(out)


def refused(args: list[str], capsys, monkeypatch) -> str:
    """`adapterzoo ARGS...`, which must fail with exit 1 and one line on stderr; that line."""
    code, _, err = run(args, capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def rank_one_tensors(specs: dict, gen: torch.Generator, alpha: float) -> dict[str, torch.Tensor]:
    """A real-size kohya/musubi LoRA's tensors from its (dtype, shape) specs, at rank 1 (random factors, `alpha`
    each): real widths without gigabytes."""
    return {k: torch.tensor(alpha) if k.endswith(".alpha") else torch.randn(
        shape[:1] + (1,) if "up" in k else (1,) + shape[1:], generator=gen) for k, (_, shape) in specs.items()}


def applied(state_dict: dict[str, torch.Tensor], x: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW·x of every module of a diffusers state dict, x[in width] a random vector: ΔW itself of a real-size
    model would take gigabytes."""
    return {k: state_dict[k.replace("lora_A", "lora_B")].double() @ (v.double() @ x[v.shape[1]])
            for k, v in state_dict.items() if k.endswith("lora_A.weight")}


def assert_best_rank(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], rank: int) -> None:
    """Every ΔW of `after` is the best rank-`rank` fit (Eckart–Young) of the same module's in `before`."""
    assert sorted(after) == sorted(before)
    for name, delta in before.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = u[:, :rank] * s[:rank] @ vh[:rank]
        assert float((after[name] - best).norm() / best.norm()) < 1e-5, name


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The same names, and every tensor equal to the bit."""
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected if not torch.equal(got[k],
                                                                                                         expected[k])]


def assert_same_model(rebuilt: torch.nn.Module, model: torch.nn.Module) -> None:
    """A model read back from a written folder: its config as saved (lists, not tuples) and every tensor."""
    def config(m) -> dict:
        return json.loads(json.dumps({k: v for k, v in m.config.items() if not k.startswith("_")}))

    assert config(rebuilt) == config(model)
    assert_same_tensors(rebuilt.state_dict(), model.state_dict())
