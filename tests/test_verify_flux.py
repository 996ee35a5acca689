"""Flux.1 in verify and sample (issue 15 §1): tiny dev/schnell pipelines built from diffusers classes, loaded as
a full folder, a BFL single file (in memory, no temporary folder) or a transformer-only folder with --pipeline;
every LoRA dialect probe reads for Flux; run-time result against diffusers' own Flux LoRA loader."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from cli_helpers import run
from diffusers import FluxPipeline
from flux_tiny import save_tiny_flux
from safetensors.torch import load_file, save_file

from adapterzoo.formats.probe import probe
from adapterzoo.verify.attach import attach
from adapterzoo.verify.denoise import Conditioning
from adapterzoo.verify.pipeline_load import load_for_sampling

SIZE = ["--size", "32x32", "--steps", "2"]
INNER = 32  # heads × head_dim of the tiny transformer
MLP = 4 * INNER
TARGETS = {  # diffusers module -> (in, out) of the tiny transformer
    "transformer_blocks.0.attn.to_q": (INNER, INNER), "transformer_blocks.0.attn.add_k_proj": (INNER, INNER),
    "transformer_blocks.0.ff.net.0.proj": (INNER, MLP), "single_transformer_blocks.0.attn.to_v": (INNER, INNER),
    "single_transformer_blocks.0.proj_out": (INNER + MLP, INNER),
}


def cli(args: list[str], capsys, monkeypatch, code: int = 0) -> dict | str:
    """The --json report (also of a failed verdict, exit 1), or the one-line error when there is none."""
    got, out, err = run(args, capsys, monkeypatch)
    assert got == code, err
    return json.loads(out) if out.strip() else err


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    """The tiny dev pipeline as a folder, as a BFL single file, as a transformer-only folder, and its other parts."""
    root = tmp_path_factory.mktemp("flux")
    folder = save_tiny_flux(root / "pipe")
    parts = save_tiny_flux(root / "parts", parts=("vae", "text_encoder", "text_encoder_2", "tokenizer",
                                                  "tokenizer_2", "scheduler"))
    transformer_only = save_tiny_flux(root / "transformer_only", parts=("transformer",))
    from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint

    convert_checkpoint(folder, root / "flux1-tiny.safetensors", "ldm")
    return {"pipe": folder, "parts": parts, "bfl": root / "flux1-tiny.safetensors",
            "transformer_only": transformer_only, "root": root}


def diffusers_lora(path: Path, zero_up: bool = False, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for module, (i, o) in TARGETS.items():
        sd[f"transformer.{module}.lora_A.weight"] = torch.randn(4, i, generator=gen) * 0.3
        sd[f"transformer.{module}.lora_B.weight"] = torch.zeros(o, 4) if zero_up else torch.randn(o, 4, generator=gen) * 0.3
    save_file(sd, str(path))
    return path


def xlabs_lora(path: Path) -> Path:
    """XLabs processor slots: qkv_lora1 on the image stream's fused qkv, proj_lora2 on the text stream's out."""
    gen = torch.Generator().manual_seed(5)
    sd = {"double_blocks.0.processor.qkv_lora1.down.weight": torch.randn(4, INNER, generator=gen) * 0.3,
          "double_blocks.0.processor.qkv_lora1.up.weight": torch.randn(3 * INNER, 4, generator=gen) * 0.3,
          "double_blocks.0.processor.proj_lora2.down.weight": torch.randn(4, INNER, generator=gen) * 0.3,
          "double_blocks.0.processor.proj_lora2.up.weight": torch.randn(INNER, 4, generator=gen) * 0.3}
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def dialects(flux, tmp_path_factory) -> dict[str, Path]:
    """One LoRA in each dialect probe reads for Flux; kohya, BFL and PEFT written by our converter."""
    from adapterzoo.formats.convert import convert

    root = tmp_path_factory.mktemp("loras")
    files = {"diffusers": diffusers_lora(root / "diffusers.safetensors"), "xlabs": xlabs_lora(root / "xlabs.safetensors")}
    for to, name in (("kohya", "kohya.safetensors"), ("bfl", "bfl.safetensors"), ("peft", "peft")):
        convert(files["diffusers"], root / name, to, checkpoint=flux["pipe"])
        files[to] = root / name
    return files


def test_every_dialect_passes_on_the_full_pipeline_and_zero_is_the_bare_model(flux, dialects, capsys, monkeypatch):
    for dialect, path in dialects.items():
        assert probe(path).base == "flux", dialect
        result = cli(["verify", str(path), "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
        assert (result["verdict"], result["reasons"]) == ("pass", []), dialect
        coverage = result["coverage"]
        assert coverage["keys_matched"] == coverage["keys_total"] and coverage["modules_hit"] == coverage["modules_total"]
        zero, *rest = result["effects"]
        assert zero["mean_abs_pixel_change"] == 0 and zero["noise_pred_rel_change"] == 0  # bit-identical at 0
        assert all(e["noise_pred_rel_change"] > 1e-3 for e in rest), dialect


def test_a_zero_up_lora_fails_no_effect(flux, tmp_path, capsys, monkeypatch):
    path = diffusers_lora(tmp_path / "zero.safetensors", zero_up=True)
    result = cli(["verify", str(path), "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch,
                 code=1)
    assert (result["verdict"], result["reasons"]) == ("fail", ["no effect: every lora_up is zero"])


def _prediction(loaded, transformer=None) -> torch.Tensor:
    """The denoiser at a fixed latent, timestep and text condition (optionally with another transformer)."""
    unet = loaded.pipe.unet
    own = unet.transformer
    unet.transformer = transformer if transformer is not None else own
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=gen)
    cond = Conditioning(torch.randn(1, 7, 32, generator=gen), {"pooled": torch.randn(1, 768, generator=gen)})
    try:
        with torch.no_grad():
            return unet(x, torch.tensor(500.0), cond.states, cond.added)[0]
    finally:
        unet.transformer = own


@pytest.mark.parametrize("dialect", ["diffusers", "kohya", "bfl", "peft"])
def test_run_time_equals_diffusers_load_lora_into_transformer(flux, dialects, dialect):
    """diffusers' kohya/BFL/XLabs converters hard-code Flux's real width (3072), so the tiny model's reference is
    diffusers loading the diffusers file the other dialects were converted from."""
    loaded = load_for_sampling(flux["pipe"], "cpu", "fp32")
    bare = _prediction(loaded)
    reference = copy.deepcopy(loaded.pipe.transformer)
    state_dict, alphas = FluxPipeline.lora_state_dict(str(dialects["diffusers"]), return_alphas=True)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=reference)
    expected = _prediction(loaded, reference)
    attached = attach(dialects[dialect], probe(dialects[dialect]), loaded)
    handle = attached.hook()
    try:
        got = _prediction(loaded)
        handle.multiplier = 0.0
        assert torch.equal(_prediction(loaded), bare)
    finally:
        attached.remove()
    assert (expected - bare).abs().max() > 1e-3
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_a_bfl_file_loads_in_memory_with_the_pipelines_parts(flux, dialects, tmp_path, capsys, monkeypatch):
    watched = tmp_path / "tmp"
    watched.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(watched))
    assert tempfile.gettempdir() == str(watched)
    lora = str(dialects["kohya"])
    message = cli(["verify", lora, "--checkpoint", str(flux["bfl"]), *SIZE, "--json"], capsys, monkeypatch,
                  code=1)["error"]
    assert "\n" not in message and "no vae (AutoencoderKL), text_encoder (CLIPTextModel)" in message and "--pipeline" in message
    from_file = cli(["verify", lora, "--checkpoint", str(flux["bfl"]), "--pipeline", str(flux["parts"]), *SIZE,
                     "--json"], capsys, monkeypatch)
    from_folder = cli(["verify", lora, "--checkpoint", str(flux["pipe"]), *SIZE, "--json"], capsys, monkeypatch)
    assert from_file["verdict"] == "pass" and from_file["base"] == "flux"
    for a, b in zip(from_file["effects"], from_folder["effects"]):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4)
    assert list(watched.iterdir()) == []


def test_a_transformer_only_folder_takes_the_rest_from_pipeline(flux, dialects, capsys, monkeypatch):
    result = cli(["verify", str(dialects["bfl"]), "--checkpoint", str(flux["transformer_only"]),
                  "--pipeline", str(flux["parts"]), *SIZE, "--json"], capsys, monkeypatch)
    assert result["verdict"] == "pass"


def test_sample_renders_a_bfl_file_with_two_loras(flux, dialects, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.png"
    report = cli(["sample", "--checkpoint", str(flux["bfl"]), "--pipeline", str(flux["parts"]),
                  "--lora", f"{dialects['kohya']}:0.7", "--lora", str(dialects["xlabs"]), "--prompt", "a red fox",
                  "-o", str(out), *SIZE, "--json"], capsys, monkeypatch)
    assert out.is_file() and report["base"] == "flux" and report["warnings"] == []
    assert all(lora["modules_hit"] == lora["modules"] > 0 for lora in report["loras"])


def test_schnell_renders_without_guidance(tmp_path, dialects, capsys, monkeypatch):
    folder = save_tiny_flux(tmp_path / "schnell", guidance=False)
    result = cli(["verify", str(dialects["diffusers"]), "--checkpoint", str(folder), *SIZE, "--json"],
                 capsys, monkeypatch)
    assert result["verdict"] == "pass"
