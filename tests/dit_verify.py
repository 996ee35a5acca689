"""What the verify tests of the DiT families share: the CLI's --json answer, a watched temp folder, and the
run-time LoRA against diffusers' own loading of it at one fixed denoiser call."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from cli_helpers import run
from safetensors.torch import save_file

from adapterzoo.formats.probe import probe
from adapterzoo.verify.attach import attach
from adapterzoo.verify.denoise import Conditioning


def cli(args: list[str], capsys, monkeypatch, code: int = 0) -> dict | str:
    """The --json report (also of a failed verdict, exit 1), or the one-line error when there is none."""
    got, out, err = run(args, capsys, monkeypatch)
    assert got == code, err or out
    return json.loads(out) if out.strip() else err


def block_linears(model: torch.nn.Module, blocks: tuple[str, ...], prefix: str = "") -> dict[str, tuple[int, int]]:
    """Every Linear of the model's blocks -> (in, out), each name behind `prefix` (diffusers' `transformer.`)."""
    return {prefix + name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(blocks)}


def diffusers_lora(path: Path, targets: dict[str, tuple[int, int]], zero_up: bool = False, seed: int = 0) -> Path:
    """What diffusers' trainers save: the modules' own paths, lora_A/lora_B of rank 4, no alpha (every B zero with
    `zero_up`)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (i, o) in targets.items():
        sd[f"{module}.lora_A.weight"] = torch.randn(4, i, generator=gen) * 0.3
        sd[f"{module}.lora_B.weight"] = torch.zeros(o, 4) if zero_up else torch.randn(o, 4, generator=gen) * 0.3
    save_file(sd, str(path))
    return path


def assert_passes_fully(result: dict, label: str, base: str | None = None) -> None:
    """What a user reads as "this file fully works": pass with no reasons (on `base`), every key matched and
    every patched module run, multiplier 0 bit-identical to the bare model, every other multiplier changing the
    noise prediction and the pixels."""
    assert (result["verdict"], result["reasons"]) == ("pass", []), label
    assert base is None or result["base"] == base, label
    coverage = result["coverage"]
    assert coverage["keys_matched"] == coverage["keys_total"] and coverage["unmatched"] == [], label
    assert coverage["modules_hit"] == coverage["modules_total"] > 0, label
    zero, *rest = result["effects"]
    assert zero["mean_abs_pixel_change"] == 0 and zero["noise_pred_rel_change"] == 0, label  # bit-identical
    assert rest and all(e["noise_pred_rel_change"] > 1e-3 and e["mean_abs_pixel_change"] > 0 for e in rest), label


def watched_tempdir(tmp_path: Path, monkeypatch) -> Path:
    """An empty folder that Python's tempfile now hands out: a test asserts it stays empty."""
    watched = tmp_path / "tmp"
    watched.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched))
    assert tempfile.gettempdir() == str(watched)
    return watched


def prediction(loaded, x: torch.Tensor, cond: Conditioning, transformer=None) -> torch.Tensor:
    """The denoiser at latents `x`, timestep 500 and `cond` (optionally with another transformer in it)."""
    unet = loaded.pipe.unet
    own = unet.transformer
    unet.transformer = transformer if transformer is not None else own
    try:
        with torch.no_grad():
            return unet(x, torch.tensor(500.0), cond.states, cond.added)[0]
    finally:
        unet.transformer = own


def assert_run_time_equals(loaded, lora: Path, reference: torch.nn.Module, x: torch.Tensor, cond: Conditioning
                           ) -> None:
    """`lora` hooked at run time predicts what `reference` (the transformer with diffusers' loading of the same
    LoRA) predicts, within 1e-5; at multiplier 0 it is bit-identical to the bare model."""
    bare = prediction(loaded, x, cond)
    expected = prediction(loaded, x, cond, reference)
    attached = attach(lora, probe(lora), loaded)
    handle = attached.hook()
    try:
        got = prediction(loaded, x, cond)
        handle.multiplier = 0.0
        assert torch.equal(prediction(loaded, x, cond), bare)
    finally:
        attached.remove()
    assert (expected - bare).abs().max() > 1e-3
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
