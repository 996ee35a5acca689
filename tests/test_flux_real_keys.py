"""Flux LoRAs with the key names and shapes of real files (InvokeAI's lists, tests/fixtures/flux_keys): probe from
the header alone at the real ranks; read with ranks cut to 1 and random values, every key lands, and each
module's ΔW (tried on random vectors) is what diffusers' own Flux converter computes where it reads the file."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import factory
import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.lora.lora_convert import convert_lora
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.probe import probe

KEYS = Path(__file__).parent / "fixtures" / "flux_keys"
ALL_BLOCKS = (list(range(19)), list(range(38)))
# list -> (format, rank, double blocks, single blocks, text encoders, diffusers modules read from the rank-1 copy)
EXPECTED = {
    "flux_lora_kohya_format": ("kohya", 16, *ALL_BLOCKS, [], 19 * 14 + 38 * 6),
    "flux_lora_kohya_with_te1_format": ("kohya", 4, *ALL_BLOCKS, ["clip_l"], 19 * 14 + 38 * 6 + 72),
    "flux_lora_diffusers_format": ("diffusers", 32, *ALL_BLOCKS, [], 494),
    "flux_lora_diffusers_no_proj_mlp_format": ("diffusers", 16, *ALL_BLOCKS, [], 342),
    "flux_lora_diffusers_base_model_format": ("peft", 4, *ALL_BLOCKS, [], 381),
    "flux_lora_aitoolkit_format": ("bfl", 16, *ALL_BLOCKS, [], 19 * 12 + 38 * 5),
    "flux_lora_xlabs_format": ("xlabs", 16, [0, 1, 10], [], [], 3 * 8),
    "flux_dora_onetrainer_format": ("kohya", 4, *ALL_BLOCKS, ["clip_l", "t5xxl"], 506),
    "flux_lokr_bfl_format": ("bfl", None, [0], [0], [], None),  # an excerpt whose kron shapes fit no module
}


def real_keys(name: str) -> dict[str, list[int]]:
    return json.loads(gzip.decompress((KEYS / f"{name}.json.gz").read_bytes()))


def rank_one(key: str, shape: list[int]) -> list[int]:
    """The shape with its rank cut to 1 (down/A: rows, up/B: columns); everything else as it is."""
    if key.endswith((".lora_down.weight", ".lora_A.weight", ".down.weight")):
        return [1, *shape[1:]]
    if key.endswith((".lora_up.weight", ".lora_B.weight", ".up.weight")):
        return [shape[0], 1, *shape[2:]]
    return shape


def write_rank_one(name: str, path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape in real_keys(name).items():
        if key.endswith(".alpha"):
            sd[key] = torch.tensor(2.0)
        else:
            sd[key] = (torch.rand(rank_one(key, shape), generator=gen) + 0.5).to(torch.float16)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("name", [*EXPECTED, "flux_control_lora_format"])
def test_probe_names_real_flux_files_from_the_header(tmp_path, name):
    specs = {k: ("F16", tuple(v)) for k, v in real_keys(name).items()}
    found = probe(factory.write_sparse_safetensors(tmp_path / f"{name}.safetensors", specs))
    assert found.base == "flux"
    if name == "flux_control_lora_format":
        assert (found.format, found.details["variant"]) == ("bfl", "control")
        return
    fmt, rank, double, single, encoders, _ = EXPECTED[name]
    coverage = found.details["coverage"]
    assert (found.format, coverage["double_blocks"], coverage["single_blocks"], coverage["text_encoders"]) == (
        fmt, double, single, encoders)
    assert found.kind == ("lycoris" if "lokr" in name else "lora")
    if rank is not None:
        assert found.rank == rank


@pytest.mark.parametrize("name", [name for name, expected in EXPECTED.items() if expected[-1] is not None])
def test_every_key_of_real_flux_files_lands(tmp_path, name):
    lora = load_lora(write_rank_one(name, tmp_path / f"{name}.safetensors"))
    assert lora.base == "flux" and len(lora.modules) == EXPECTED[name][-1]


def _probe_deltas(state_dict: dict[str, torch.Tensor], x: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' converted state dict (alpha baked in): module -> B @ (A @ x). Its CLIP paths keep `text_model.`,
    which its loader strips for a transformers 5 CLIP (FLUX.md §3.2), and its old attention-processor names
    (`self_attn.to_q_lora`, `fc1.lora_linear_layer`): the same modules as ours."""
    out = {}
    for key, down in state_dict.items():
        for down_suffix, up_suffix in ((".lora_A.weight", ".lora_B.weight"), (".down.weight", ".up.weight")):
            if not key.endswith(down_suffix):
                continue
            up = state_dict[key.removesuffix(down_suffix) + up_suffix]
            module = key.removesuffix(down_suffix).replace("text_encoder.text_model.", "text_encoder.")
            module = re.sub(r"\.lora_linear_layer$", "", module)
            module = re.sub(r"self_attn\.to_(q|k|v|out)_lora$", lambda m: f"self_attn.{m[1]}_proj", module)
            out[module] = up.double() @ (down.double() @ x[down.shape[1]])
    return out


@pytest.mark.parametrize("name", ["flux_lora_kohya_with_te1_format", "flux_lora_xlabs_format"])
def test_real_flux_files_mean_what_diffusers_reads_at_full_width(tmp_path, name):
    path = write_rank_one(name, tmp_path / f"{name}.safetensors")
    ours = load_lora(path)
    theirs = FluxPipeline.lora_state_dict(str(path))
    gen = torch.Generator().manual_seed(1)
    x = {width: torch.randn(width, generator=gen, dtype=torch.float64) for width in (768, 3072, 12288, 15360)}
    expected = _probe_deltas(theirs, x)
    assert sorted(expected) == sorted(ours.modules)
    for path_, reference in expected.items():
        module = ours.modules[path_]
        got = module.scale * module.up.double() @ (module.down.double() @ x[module.down.shape[1]])
        assert torch.allclose(got, reference, rtol=1e-3), path_  # fp16 factors: diffusers bakes alpha in fp16


def test_diffusers_loads_nothing_from_comfyui_names_that_we_read(tmp_path):
    path = write_rank_one("flux_lora_aitoolkit_format", tmp_path / "aitoolkit.safetensors")
    theirs = FluxPipeline.lora_state_dict(str(path))
    assert not any(k.startswith("transformer.") for k in theirs)  # diffusers 0.42: "No LoRA keys associated"
    assert len(load_lora(path).modules) == EXPECTED["flux_lora_aitoolkit_format"][-1]


def test_control_lora_is_refused_with_the_reason(tmp_path):
    path = write_rank_one("flux_control_lora_format", tmp_path / "control.safetensors")
    with pytest.raises(AdapterzooError, match="Control LoRA"):
        convert_lora(path, tmp_path / "out.safetensors", "diffusers")


def test_builtin_flux_resolves_without_importing_diffusers():
    script = ("import sys; from adapterzoo.formats.model.architectures import builtin_architecture as b; "
              "a = b('flux'); print(len(a.targets), sorted({'diffusers', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split(maxsplit=1) == ["975", "[]\n"]


def test_real_kohya_with_clip_round_trips_through_every_dialect(tmp_path):
    """kohya (transformer + CLIP-L) -> peft (a folder per component) / diffusers -> kohya: same modules, same ΔW."""
    src = write_rank_one("flux_lora_kohya_with_te1_format", tmp_path / "kohya.safetensors")
    original = load_lora(src)
    gen = torch.Generator().manual_seed(2)
    x = {width: torch.randn(width, generator=gen, dtype=torch.float64) for width in (768, 3072, 12288, 15360)}

    def applied(lora) -> dict[str, torch.Tensor]:
        return {p: m.scale * m.up.double() @ (m.down.double() @ x[m.down.shape[1]]) for p, m in lora.modules.items()}

    reference = applied(original)
    convert_lora(src, tmp_path / "peft", "peft")
    assert probe(tmp_path / "peft").format == "peft"
    convert_lora(tmp_path / "peft", tmp_path / "diffusers.safetensors", "diffusers")
    convert_lora(tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors", "kohya")
    for step in (tmp_path / "peft", tmp_path / "diffusers.safetensors", tmp_path / "back.safetensors"):
        got = applied(load_lora(step))
        assert sorted(got) == sorted(reference)
        assert all(torch.allclose(got[p], r, rtol=2e-3, atol=1e-3 * r.abs().max()) for p, r in reference.items()), step


def test_what_diffusers_drops_or_refuses_we_read(tmp_path):
    """diffusers 0.42 converts kohya embedder/final-layer keys without the `transformer.` prefix (its loader then
    ignores them) and routes PEFT files with diffusers names to a converter that expects BFL names."""
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for name, (out, inp) in {"img_in": (3072, 64), "final_layer_linear": (64, 3072),
                             "double_blocks_0_img_attn_proj": (3072, 3072)}.items():
        sd |= {f"lora_unet_{name}.lora_down.weight": torch.randn(1, inp, generator=gen),
               f"lora_unet_{name}.lora_up.weight": torch.randn(out, 1, generator=gen),
               f"lora_unet_{name}.alpha": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    theirs = FluxPipeline.lora_state_dict(str(tmp_path / "kohya.safetensors"))
    assert sorted(k.rsplit(".", 2)[0] for k in theirs if k.startswith("transformer."))[0].endswith("to_out.0")
    assert len([k for k in theirs if k.startswith("transformer.")]) == 2  # only the block module survives
    ours = load_lora(tmp_path / "kohya.safetensors")
    assert sorted(ours.modules) == ["transformer.proj_out", "transformer.transformer_blocks.0.attn.to_out.0",
                                    "transformer.x_embedder"]
    peft = write_rank_one("flux_lora_diffusers_base_model_format", tmp_path / "peft.safetensors")
    with pytest.raises(KeyError):
        FluxPipeline.lora_state_dict(str(peft))
    assert len(load_lora(peft).modules) == EXPECTED["flux_lora_diffusers_base_model_format"][-1]
