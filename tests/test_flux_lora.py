"""Flux LoRAs, every dialect in and out (issue 11), against independent oracles: diffusers' own Flux loader
(FluxPipeline.lora_state_dict + load_lora_into_transformer) and peft on a tiny FluxTransformer2DModel, and
ΔW computed here in plain torch from each file's own tensors with the BFL -> diffusers rows of FLUX.md §1.2
written out below (never adapterzoo's table)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import factory
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import PeftModel
from safetensors.torch import load_file, save_file

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.convert import convert
from adapterzoo.formats.families.flux.modules import flux_architecture_from_tables
from adapterzoo.formats.lora.lora_convert import convert_lora
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.model.module_tables import table_of
from adapterzoo.formats.model.targets import TRANSFORMER
from adapterzoo.formats.probe import probe

H, M, IN, JOINT, POOLED, RANK = 256, 1024, 8, 32, 16, 4  # 2 heads x 128, one double and one single block
TOLERANCE = 1e-4


def _rows(*parts: tuple[str, int]) -> list[tuple[str, int, int]]:
    """Consecutive row blocks of a fused weight: (diffusers path, start, stop)."""
    out, start = [], 0
    for path, rows in parts:
        out.append((path, start, start + rows))
        start += rows
    return out


# BFL module -> (diffusers module, rows of the BFL weight), FLUX.md §1.2; in dims for random factors.
B, S = "transformer_blocks.0", "single_transformer_blocks.0"
BFL = {
    "img_in": (_rows(("x_embedder", H)), IN),
    "txt_in": (_rows(("context_embedder", H)), JOINT),
    "time_in.in_layer": (_rows(("time_text_embed.timestep_embedder.linear_1", H)), 256),
    "time_in.out_layer": (_rows(("time_text_embed.timestep_embedder.linear_2", H)), H),
    "vector_in.in_layer": (_rows(("time_text_embed.text_embedder.linear_1", H)), POOLED),
    "guidance_in.out_layer": (_rows(("time_text_embed.guidance_embedder.linear_2", H)), H),
    "double_blocks.0.img_attn.qkv": (_rows((f"{B}.attn.to_q", H), (f"{B}.attn.to_k", H), (f"{B}.attn.to_v", H)), H),
    "double_blocks.0.txt_attn.qkv": (_rows((f"{B}.attn.add_q_proj", H), (f"{B}.attn.add_k_proj", H),
                                           (f"{B}.attn.add_v_proj", H)), H),
    "double_blocks.0.img_attn.proj": (_rows((f"{B}.attn.to_out.0", H)), H),
    "double_blocks.0.txt_attn.proj": (_rows((f"{B}.attn.to_add_out", H)), H),
    "double_blocks.0.img_mlp.0": (_rows((f"{B}.ff.net.0.proj", M)), H),
    "double_blocks.0.txt_mlp.2": (_rows((f"{B}.ff_context.net.2", H)), M),
    "double_blocks.0.img_mod.lin": (_rows((f"{B}.norm1.linear", 6 * H)), H),
    "double_blocks.0.txt_mod.lin": (_rows((f"{B}.norm1_context.linear", 6 * H)), H),
    "single_blocks.0.linear1": (_rows((f"{S}.attn.to_q", H), (f"{S}.attn.to_k", H), (f"{S}.attn.to_v", H),
                                      (f"{S}.proj_mlp", M)), H),
    "single_blocks.0.linear2": (_rows((f"{S}.proj_out", H)), H + M),
    "single_blocks.0.modulation.lin": (_rows((f"{S}.norm.linear", 3 * H)), H),
    "final_layer.linear": (_rows(("proj_out", IN)), H),
    # BFL (shift, scale) vs diffusers (scale, shift): ΔW's two row halves trade places (FLUX.md §1.3)
    "final_layer.adaLN_modulation.1": ([("norm_out.linear", H, 2 * H), ("norm_out.linear", 0, H)], H),
}
XLABS = {"double_blocks.0.processor.qkv_lora1": "double_blocks.0.img_attn.qkv",
         "double_blocks.0.processor.proj_lora1": "double_blocks.0.img_attn.proj",
         "double_blocks.0.processor.qkv_lora2": "double_blocks.0.txt_attn.qkv",
         "double_blocks.0.processor.proj_lora2": "double_blocks.0.txt_attn.proj",
         "single_blocks.0.processor.qkv_lora": "single_blocks.0.linear1",
         "single_blocks.0.processor.proj_lora": "single_blocks.0.linear2"}


def _out_rows(name: str) -> int:
    return max(stop for _, _, stop in BFL[name][0])


def bfl_deltas(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """diffusers module -> ΔW (float64) from LoRAs on BFL modules: s · up @ down, rows as FLUX.md says."""
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, scale) in factors.items():
        delta = scale * up.double() @ down.double()
        pieces: dict[str, list[torch.Tensor]] = {}
        for path, start, stop in BFL[name][0]:
            if start >= delta.shape[0]:  # an XLabs single-block qkv_lora has no MLP rows
                continue
            pieces.setdefault(f"transformer.{path}", []).append(delta[start:stop])
        for path, blocks in pieces.items():
            out[path] = torch.cat(blocks)
    return out


def file_deltas(sd: dict[str, torch.Tensor], down_suffix: str, up_suffix: str, prefix: str = "") -> dict:
    """BFL-named file -> diffusers ΔW: each module's alpha / r (r when no alpha), then bfl_deltas."""
    factors = {}
    for key, down in sd.items():
        if not key.endswith(down_suffix):
            continue
        stem = key.removesuffix(down_suffix)
        name = stem.removeprefix(prefix)
        if prefix == "lora_unet_":
            name = next(n for n in BFL if n.replace(".", "_") == name)
        alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else down.shape[0]
        factors[name] = (down, sd[stem + up_suffix], alpha / down.shape[0])
    return bfl_deltas(factors)


def diffusers_deltas(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"transformer.{k.removeprefix(prefix).removesuffix('.lora_A.weight')}":
            sd[k.replace("lora_A", "lora_B")].double() @ v.double()
            for k, v in sd.items() if k.endswith(".lora_A.weight")}


def assert_same_deltas(lora, reference: dict[str, torch.Tensor]) -> None:
    assert sorted(lora.modules) == sorted(reference)
    for path, expected in reference.items():
        got = lora.modules[path].delta().double()
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * expected.abs().max()), path


@pytest.fixture(scope="module")
def model() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=IN, num_layers=1, num_single_layers=1,
                                  attention_head_dim=128, num_attention_heads=2, joint_attention_dim=JOINT,
                                  pooled_projection_dim=POOLED, guidance_embeds=True).eval()


@pytest.fixture(scope="module")
def arch(model):
    return flux_architecture_from_tables({TRANSFORMER: table_of(model)})


@pytest.fixture(scope="module")
def factors() -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A random LoRA on every BFL module of the tiny model: (down, up, alpha), ranks and alphas varied."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for i, (name, (_, in_dim)) in enumerate(BFL.items()):
        rank = RANK + i % 3
        out[name] = (torch.randn(rank, in_dim, generator=gen) * 0.1, torch.randn(_out_rows(name), rank, generator=gen)
                     * 0.1, float(1 + i % 4))
    return out


def kohya_file(factors, path: Path, prefix: str = "lora_unet_", down="lora_down", up="lora_up", alpha=True) -> Path:
    sd = {}
    for name, (d, u, a) in factors.items():
        stem = prefix + (name.replace(".", "_") if prefix == "lora_unet_" else name)
        sd[f"{stem}.{down}.weight"], sd[f"{stem}.{up}.weight"] = d, u
        if alpha:
            sd[f"{stem}.alpha"] = torch.tensor(a)
    save_file(sd, str(path))
    return path


def inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {"hidden_states": torch.randn(1, 4, IN, generator=gen),
            "encoder_hidden_states": torch.randn(1, 3, JOINT, generator=gen),
            "pooled_projections": torch.randn(1, POOLED, generator=gen), "timestep": torch.tensor([0.5]),
            "img_ids": torch.zeros(4, 3), "txt_ids": torch.zeros(3, 3), "guidance": torch.tensor([3.5])}


@torch.no_grad()
def forward(model) -> torch.Tensor:
    return model(**inputs(), return_dict=False)[0].double()


@torch.no_grad()
def patched(model, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference output: each module's weight plus its plain-torch ΔW."""
    reference = copy.deepcopy(model)
    modules = dict(reference.named_modules())
    for path, delta in deltas.items():
        weight = modules[path.removeprefix("transformer.")].weight
        weight += delta.to(weight.dtype)
    return forward(reference)


def assert_outputs_equal(got: torch.Tensor, reference: torch.Tensor, base: torch.Tensor) -> float:
    assert (reference - base).norm() > 1e-2 * reference.norm()  # the LoRA really changes the output
    error = float((got - reference).norm() / reference.norm())
    assert error < TOLERANCE
    return error


def diffusers_loaded(model, path: Path) -> torch.Tensor:
    """What diffusers' Flux pipeline loader makes of the file, on a copy of the model."""
    state_dict, alphas = FluxPipeline.lora_state_dict(str(path), return_alphas=True)
    loaded = copy.deepcopy(model)
    FluxPipeline.load_lora_into_transformer(state_dict, network_alphas=alphas, transformer=loaded)
    return forward(loaded)


# -- reading every dialect ----------------------------------------------------------------------------------


def test_kohya_reads_onto_the_split_modules_with_the_fused_delta(tmp_path, arch, factors):
    path = kohya_file(factors, tmp_path / "kohya.safetensors")
    lora = load_lora(path, architecture=arch)
    assert lora.source_format == "kohya"
    assert_same_deltas(lora, file_deltas(load_file(path), ".lora_down.weight", ".lora_up.weight", "lora_unet_"))


@pytest.mark.parametrize("parts,alpha", [(("lora_down", "lora_up"), True), (("lora_A", "lora_B"), False)])
def test_bfl_comfyui_names_read_with_and_without_alpha(tmp_path, arch, factors, parts, alpha):
    path = kohya_file(factors, tmp_path / "bfl.safetensors", "diffusion_model.", *parts, alpha=alpha)
    lora = load_lora(path, architecture=arch)
    assert lora.source_format == "bfl" and probe(path).format == "bfl"
    expected = file_deltas(load_file(path), f".{parts[0]}.weight", f".{parts[1]}.weight", "diffusion_model.")
    assert_same_deltas(lora, expected)


def test_xlabs_reads_like_diffusers_loads_it(tmp_path, model, arch, factors):
    sd = {}
    for slot, name in XLABS.items():
        down, up, _ = factors[name]
        up = up[:3 * H] if slot.endswith(".qkv_lora") else up  # a single block's qkv_lora: linear1's q, k, v rows
        sd[f"{slot}.down.weight"], sd[f"{slot}.up.weight"] = down, up
    path = tmp_path / "xlabs.safetensors"
    save_file(sd, str(path))
    expected = bfl_deltas({XLABS[s.removesuffix(".down.weight")]: (d, sd[s.replace(".down.", ".up.")], 1.0)
                           for s, d in sd.items() if s.endswith(".down.weight")})
    lora = load_lora(path, architecture=arch)
    assert probe(path).format == "xlabs"
    assert_same_deltas(lora, expected)
    assert_outputs_equal(diffusers_loaded(model, path), patched(model, expected), forward(model))


def test_diffusers_peft_and_onetrainer_names_read(tmp_path, arch, factors):
    split = {p: (torch.randn(RANK, m.shape[1]) * 0.1, torch.randn(m.shape[0], RANK) * 0.1)
             for p, m in {f"transformer.{path}": dict(copy.deepcopy(arch).targets)[f"transformer.{path}"]
                          for path in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
                                       "norm_out.linear", "x_embedder")}.items()}
    diffusers = {f"{p}.lora_A.weight": d for p, (d, u) in split.items()} | {
        f"{p}.lora_B.weight": u for p, (d, u) in split.items()}
    save_file(diffusers, str(tmp_path / "d.safetensors"))
    expected = diffusers_deltas(diffusers, "transformer.")
    assert_same_deltas(load_lora(tmp_path / "d.safetensors", architecture=arch), expected)

    peft = tmp_path / "peft"
    peft.mkdir()
    save_file({k.replace("transformer.", "base_model.model.", 1): v for k, v in diffusers.items()},
              str(peft / "adapter_model.safetensors"))
    (peft / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK}))
    doubled = {p: 2 * d for p, d in expected.items()}
    assert_same_deltas(load_lora(peft, architecture=arch), doubled)

    onetrainer = {}
    for p, (d, u) in split.items():
        stem = "lora_transformer_" + p.removeprefix("transformer.").replace(".", "_")
        onetrainer |= {f"{stem}.lora_down.weight": d, f"{stem}.lora_up.weight": u, f"{stem}.alpha": torch.tensor(2.0)}
    save_file(onetrainer, str(tmp_path / "ot.safetensors"))
    half = {p: d * 2.0 / RANK for p, d in expected.items()}
    assert_same_deltas(load_lora(tmp_path / "ot.safetensors", architecture=arch), half)


# -- writing every dialect --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kohya_source(tmp_path_factory, factors) -> tuple[Path, dict[str, torch.Tensor]]:
    path = kohya_file(factors, tmp_path_factory.mktemp("src") / "kohya.safetensors")
    return path, file_deltas(load_file(path), ".lora_down.weight", ".lora_up.weight", "lora_unet_")


def test_diffusers_output_loads_in_diffusers_with_the_reference_outputs(tmp_path, model, arch, kohya_source):
    src, expected = kohya_source
    dest = tmp_path / "out.safetensors"
    convert_lora(src, dest, "diffusers", architecture=arch)
    assert_same_deltas(load_lora(dest, architecture=arch), expected)
    assert_outputs_equal(diffusers_loaded(model, dest), patched(model, expected), forward(model))


def test_peft_output_loads_in_peft_with_the_reference_outputs(tmp_path, model, arch, kohya_source):
    src, expected = kohya_source
    dest = tmp_path / "peft"
    convert_lora(src, dest, "peft", architecture=arch)
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(dest))
        got = loaded(**inputs(), return_dict=False)[0].double()
    assert_outputs_equal(got, patched(model, expected), forward(model))


@pytest.mark.parametrize("to", ["kohya", "bfl"])
def test_kohya_and_bfl_outputs_fuse_back_exactly(tmp_path, arch, kohya_source, to):
    """kohya -> diffusers (split) -> kohya / bfl (fused): the same ΔW on every module, the same ranks."""
    src, expected = kohya_source
    convert_lora(src, tmp_path / "split.safetensors", "diffusers", architecture=arch)
    dest = tmp_path / f"{to}.safetensors"
    convert_lora(tmp_path / "split.safetensors", dest, to, architecture=arch)
    written = load_file(dest)
    if to == "kohya":
        assert_same_deltas(load_lora(dest, architecture=arch),
                           file_deltas(written, ".lora_down.weight", ".lora_up.weight", "lora_unet_"))
        original = load_file(src)
        assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in original.items()}
    else:
        assert not any(k.endswith(".alpha") for k in written)
        deltas = file_deltas(written, ".lora_A.weight", ".lora_B.weight", "diffusion_model.")
        assert sorted(deltas) == sorted(expected)
    got = file_deltas(written, *((".lora_down.weight", ".lora_up.weight", "lora_unet_") if to == "kohya"
                                 else (".lora_A.weight", ".lora_B.weight", "diffusion_model.")))
    for path, delta in expected.items():
        assert torch.allclose(got[path], delta, rtol=1e-5, atol=1e-6 * delta.abs().max()), path


def test_split_loras_with_their_own_downs_fuse_block_diagonally(tmp_path, arch):
    """q and v with different downs, ranks and alphas (k absent) -> one linear1 LoRA: rank summed, zero rows."""
    gen = torch.Generator().manual_seed(3)
    sd = {}
    for part, rank, alpha in (("attn.to_q", 2, 1.0), ("attn.to_v", 3, 6.0)):
        stem = f"lora_transformer_single_transformer_blocks_0_{part.replace('.', '_')}"
        sd |= {f"{stem}.lora_down.weight": torch.randn(rank, H, generator=gen),
               f"{stem}.lora_up.weight": torch.randn(H, rank, generator=gen), f"{stem}.alpha": torch.tensor(alpha)}
    save_file(sd, str(tmp_path / "split.safetensors"))
    convert_lora(tmp_path / "split.safetensors", tmp_path / "fused.safetensors", "kohya", architecture=arch)
    fused = load_file(tmp_path / "fused.safetensors")
    assert sorted(fused) == [f"lora_unet_single_blocks_0_linear1.{p}" for p in ("alpha", "lora_down.weight",
                                                                                 "lora_up.weight")]
    up, down = fused["lora_unet_single_blocks_0_linear1.lora_up.weight"], \
        fused["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    assert down.shape == (5, H) and up.shape == (3 * H + M, 5)
    delta = float(fused["lora_unet_single_blocks_0_linear1.alpha"]) / 5 * up.double() @ down.double()
    for part, start in (("attn.to_q", 0), ("attn.to_v", 2 * H)):
        stem = f"lora_transformer_single_transformer_blocks_0_{part.replace('.', '_')}"
        d, u = sd[f"{stem}.lora_down.weight"].double(), sd[f"{stem}.lora_up.weight"].double()
        expected = float(sd[f"{stem}.alpha"]) / d.shape[0] * u @ d
        assert torch.allclose(delta[start:start + H], expected, rtol=1e-5, atol=1e-5)
    assert delta[H:2 * H].abs().max() == 0 and delta[3 * H:].abs().max() == 0


# -- the command as a user meets it ----------------------------------------------------------------------------


def test_convert_with_a_tiny_flux_folder_as_checkpoint(tmp_path, model, kohya_source):
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    src, expected = kohya_source
    report = convert(src, tmp_path / "out.safetensors", "diffusers", checkpoint=str(folder))
    assert report["from"] == "kohya" and report["base"] == "flux" and report["modules"] == len(expected)
    assert_outputs_equal(diffusers_loaded(model, tmp_path / "out.safetensors"), patched(model, expected),
                         forward(model))


def test_refusals_say_why(tmp_path, arch, factors):
    control = kohya_file(factors, tmp_path / "control.safetensors", "", "lora_A", "lora_B", alpha=False)
    sd = load_file(control)
    sd["double_blocks.0.img_attn.qkv.lora_B.bias"] = torch.zeros(3 * H)
    save_file(sd, str(control))
    found = probe(control)
    assert (found.base, found.format, found.details["variant"]) == ("flux", "bfl", "control")
    with pytest.raises(AdapterzooError, match="Control LoRA"):
        convert_lora(control, tmp_path / "c.safetensors", "kohya", architecture=arch)
    clip = tmp_path / "with_te.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2),
               "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(2, 3072),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 2)}, str(clip))
    with pytest.raises(AdapterzooError, match="transformer only.*text_encoder"):
        convert_lora(clip, tmp_path / "b.safetensors", "bfl")
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2, 1, 1)}, str(sd1))
    with pytest.raises(AdapterzooError, match="Flux"):
        convert_lora(sd1, tmp_path / "x.safetensors", "bfl", base="sd1")


def test_lokr_on_fused_projections_splits_and_fuses_exactly(tmp_path, arch):
    """A LoKr on qkv / linear1 has no per-row factors: its parts get their rows of ΔW, and kohya gets it back."""
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for name, (a, c), (b, d) in (("double_blocks.0.img_attn.qkv", (8, 4), (96, 64)),
                                 ("single_blocks.0.linear1", (7, 4), (256, 64))):
        sd |= {f"diffusion_model.{name}.lokr_w1": torch.randn(a, c, generator=gen),
               f"diffusion_model.{name}.lokr_w2": torch.randn(b, d, generator=gen),
               f"diffusion_model.{name}.alpha": torch.tensor(4.0)}
    save_file(sd, str(tmp_path / "lokr.safetensors"))
    expected = bfl_deltas({name: (torch.eye(H).double(),
                                  torch.kron(sd[f"diffusion_model.{name}.lokr_w1"].double(),
                                             sd[f"diffusion_model.{name}.lokr_w2"].double()), 1.0)
                           for name in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1")})
    lora = load_lora(tmp_path / "lokr.safetensors", architecture=arch)
    assert_same_deltas(lora, expected)
    convert_lora(tmp_path / "lokr.safetensors", tmp_path / "kohya.safetensors", "kohya", architecture=arch)
    written = load_file(tmp_path / "kohya.safetensors")
    fused = written["lora_unet_double_blocks_0_img_attn_qkv.diff"].double()
    assert torch.allclose(fused, torch.kron(sd["diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1"].double(),
                                            sd["diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2"].double()),
                          rtol=1e-5, atol=1e-5)
    assert_same_deltas(load_lora(tmp_path / "kohya.safetensors", architecture=arch), expected)


def test_the_commands_as_a_user_runs_them(tmp_path, model, kohya_source, capsys, monkeypatch):
    """probe --json names the dialect and coverage; convert --to bfl against a tiny Flux folder writes a file
    with the reference ΔW; --to bfl of an SD LoRA is one line on stderr and exit 1."""
    from cli_helpers import run

    src, expected = kohya_source
    code, out, _ = run(["probe", str(src), "--json"], capsys, monkeypatch)
    found = json.loads(out)
    assert code == 0 and (found["kind"], found["base"], found["format"]) == ("lora", "flux", "kohya")
    assert (found["details"]["coverage"]["double_blocks"], found["details"]["coverage"]["single_blocks"]) == ([0], [0])
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    dest = tmp_path / "bfl.safetensors"
    code, out, err = run(["convert", str(src), "-o", str(dest), "--to", "bfl", "--checkpoint", str(folder)],
                         capsys, monkeypatch)
    assert code == 0, err
    got = file_deltas(load_file(dest), ".lora_A.weight", ".lora_B.weight", "diffusion_model.")
    assert sorted(got) == sorted(expected)
    assert all(torch.allclose(got[p], d, rtol=1e-5, atol=1e-6 * d.abs().max()) for p, d in expected.items())
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 320, 1, 1),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 2, 1, 1)}, str(sd1))
    code, _, err = run(["convert", str(sd1), "-o", str(tmp_path / "x.safetensors"), "--to", "bfl", "--base", "sd1"],
                       capsys, monkeypatch)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Flux" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_bfl_single_file_as_checkpoint_gives_the_same_modules(tmp_path, arch, kohya_source):
    """The config is read from the file's shapes (FLUX.md §1.4); only the header is needed."""
    specs = {f"model.diffusion_model.{k}": ("BF16", shape) for k, shape in {
        "img_in.weight": (H, IN), "txt_in.weight": (H, JOINT), "vector_in.in_layer.weight": (H, POOLED),
        "guidance_in.in_layer.weight": (H, 256), "final_layer.linear.weight": (IN, H),
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,), "double_blocks.0.img_attn.qkv.weight": (3 * H, H),
        "single_blocks.0.linear1.weight": (3 * H + M, H)}.items()}
    single = factory.write_sparse_safetensors(tmp_path / "flux-tiny.safetensors", specs)
    src, expected = kohya_source
    report = convert(src, tmp_path / "out.safetensors", "diffusers", checkpoint=str(single))
    assert report["modules"] == len(expected)
    assert_same_deltas(load_lora(tmp_path / "out.safetensors", architecture=arch), expected)


def test_a_flux_pipeline_folder_as_checkpoint_resolves_clip_too(tmp_path, model, kohya_source):
    folder = factory.save_flux_pipeline(model, tmp_path / "pipeline", with_clip=True)
    src, expected = kohya_source
    sd = load_file(src)
    clip = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd |= {f"{clip}.lora_down.weight": torch.randn(2, 768), f"{clip}.lora_up.weight": torch.randn(768, 2),
           f"{clip}.alpha": torch.tensor(1.0)}
    save_file(sd, str(tmp_path / "with_clip.safetensors"))
    report = convert(tmp_path / "with_clip.safetensors", tmp_path / "out.safetensors", "diffusers",
                     checkpoint=str(folder))
    assert report["components"] == {"transformer": len(expected), "text_encoder": 1}
    written = load_file(tmp_path / "out.safetensors")
    delta = written["text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight"].double() @ \
        written["text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight"].double()
    reference = sd[f"{clip}.lora_up.weight"].double() @ sd[f"{clip}.lora_down.weight"].double() / 2
    assert torch.allclose(delta, reference, rtol=1e-5, atol=1e-6)
