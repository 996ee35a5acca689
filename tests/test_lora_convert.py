"""LoRA conversion: every written dialect must load in the real consumers (diffusers, peft) and give
the outputs of the peft-applied model; LyCORIS deltas match the FORMATS.md formulas computed here;
the two real cloneofsimo files land pair by pair on the right SD1.5 modules."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import factory
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.families.sd.modules import TEXT_ENCODER_CONFIGS, UNET_CONFIGS
from adapterzoo.formats.lora.lora_convert import convert_lora
from adapterzoo.formats.lora.lora_read import UnmatchedKeysError, load_lora
from adapterzoo.formats.model.architectures import architecture_from_models, builtin_architecture
from adapterzoo.tiny_models import tiny_pipeline

REAL = factory.REAL
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TOLERANCE = 1e-4



def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def text_encoders(pipe) -> dict[str, torch.nn.Module]:
    out = {"text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = pipe.text_encoder_2
    return out


class Probe:
    """Fixed inputs and the outputs a model gives on them."""

    def __init__(self, base: str) -> None:
        g = torch.Generator().manual_seed(7)
        context = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[base]
        self.sample = torch.randn(1, 4, 8, 8, generator=g)
        self.context = torch.randn(1, 5, context, generator=g)
        self.ids = torch.randint(0, 500, (1, 7), generator=g)
        self.added = None
        if base == "sdxl":
            self.added = {"text_embeds": torch.randn(1, 1280, generator=g), "time_ids": torch.randn(1, 6, generator=g)}

    @torch.no_grad()
    def unet(self, unet: torch.nn.Module) -> torch.Tensor:
        return unet(self.sample, 10, self.context, added_cond_kwargs=self.added).sample

    @torch.no_grad()
    def text(self, encoder: torch.nn.Module) -> torch.Tensor:
        return encoder(self.ids).last_hidden_state

    def outputs(self, unet, encoders: dict) -> dict[str, torch.Tensor]:
        return {"unet": self.unet(unet), **{name: self.text(te) for name, te in encoders.items()}}


def lora_configs(base: str) -> dict[str, LoraConfig]:
    """alpha != r, per-module ranks and alphas, rsLoRA with mixed ranks: every scale rule at once.

    Per-module alphas sit where diffusers' own kohya reader can take them (a resnet conv, SDXL's second
    CLIP MLP): it loses them on attention layers and on CLIPs without `text_model.` (it builds alpha
    patterns like `...processor.to_k_lora.down.weight.alpha` and `text_model...self_attn`, matching
    nothing). Attention alphas and rsLoRA with mixed ranks are proven on the raw PEFT folder below.
    """
    attn = f"down_blocks.{1 if base == 'sdxl' else 0}.attentions.0.transformer_blocks.0"
    unet = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS,
                      rank_pattern={f"{attn}.attn1.to_q": 2, "up_blocks.1.resnets.0.conv1": 6},
                      alpha_pattern={"up_blocks.1.resnets.1.conv2": 1.5})
    configs = {"unet": unet,
               "text_encoder": LoraConfig(r=4, lora_alpha=2, use_rslora=True, init_lora_weights=False,
                                          target_modules=TE_TARGETS)}
    if base == "sdxl":
        configs["text_encoder_2"] = LoraConfig(r=3, lora_alpha=5, init_lora_weights=False, target_modules=TE_TARGETS,
                                               alpha_pattern={"text_model.encoder.layers.0.mlp.fc2": 7})
    return configs


class Case:
    """A tiny pipeline with a peft LoRA on every component, saved the way diffusers trainers save it."""

    def __init__(self, base: str, folder: Path) -> None:
        self.base = base
        self.probe = Probe(base)
        clean = tiny_pipeline(base, 0)
        self.architecture = architecture_from_models(base, {"unet": clean.unet, **text_encoders(clean)})
        self.baseline = self.probe.outputs(clean.unet, text_encoders(clean))
        pipe = tiny_pipeline(base, 0)
        torch.manual_seed(1)
        models = {"unet": pipe.unet, **text_encoders(pipe)}
        configs = lora_configs(base)
        for name, model in models.items():
            model.add_adapter(configs[name])
        self.reference = self.probe.outputs(pipe.unet, text_encoders(pipe))
        layers = {f"{name}_lora_layers": get_peft_model_state_dict(m) for name, m in models.items()}
        metadata = {f"{name}_lora_adapter_metadata": configs[name].to_dict() for name in models}
        self.pipeline_class = StableDiffusionXLPipeline if base == "sdxl" else StableDiffusionPipeline
        self.pipeline_class.save_lora_weights(folder, **layers, **metadata)
        self.source = folder / "pytorch_lora_weights.safetensors"

    def check(self, outputs: dict[str, torch.Tensor]) -> None:
        for name, reference in self.reference.items():
            assert rel(reference, self.baseline[name]) > 1e-2, f"{name}: the LoRA should change the output"
            assert rel(outputs[name], reference) <= TOLERANCE, name

    def diffusers_outputs(self, lora_file: Path) -> dict[str, torch.Tensor]:
        pipe = tiny_pipeline(self.base, 0)
        pipe.load_lora_weights(str(lora_file))
        return self.probe.outputs(pipe.unet, text_encoders(pipe))

    def peft_outputs(self, folder: Path) -> dict[str, torch.Tensor]:
        pipe = tiny_pipeline(self.base, 0)
        models = {"unet": pipe.unet, **text_encoders(pipe)}
        wrapped = {name: PeftModel.from_pretrained(model, str(folder / name)) for name, model in models.items()}
        return self.probe.outputs(wrapped["unet"], {k: v for k, v in wrapped.items() if k != "unet"})


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    """Built on first use, shared by every test of the module."""

    class Lazy(dict):
        def __missing__(self, base: str) -> Case:
            self[base] = Case(base, tmp_path_factory.mktemp(base))
            return self[base]

    return Lazy()


@pytest.fixture(params=["sd1", "sdxl"])
def case(request, cases) -> Case:
    return cases[request.param]


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_converted_file_loads_in_diffusers_like_the_peft_model(case: Case, to: str, tmp_path: Path) -> None:
    out = tmp_path / f"{to}.safetensors"
    report = convert_lora(case.source, out, to, architecture=case.architecture)
    assert report["modules"] == sum(1 for k in load_file(out) if k.endswith(("lora_down.weight", "lora_A.weight")))
    case.check(case.diffusers_outputs(out))


def test_peft_folder_loads_in_peft_like_the_peft_model(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "peft"
    convert_lora(case.source, out, "peft", architecture=case.architecture)
    case.check(case.peft_outputs(out))


def patched_outputs(case: Case, deltas: dict[tuple[str, str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fresh pipeline with W += ΔW in plain torch, by (component, module path): no loader involved."""
    pipe = tiny_pipeline(case.base, 0)
    with torch.no_grad():
        for (component, path), delta in deltas.items():
            weight = getattr(pipe, component).get_submodule(path).weight
            weight += delta.reshape(weight.shape)
    return case.probe.outputs(pipe.unet, text_encoders(pipe))


def b_times_a(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """lora_B @ lora_A per module, what a loader that reads only the tensors applies, by module name."""
    return {key[len(prefix):-len(".lora_A.weight")]: (tensors[key.replace("lora_A", "lora_B")].float().flatten(1)
                                                     @ tensors[key].float().flatten(1))
            for key in tensors if key.startswith(prefix) and key.endswith(".lora_A.weight")}


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_converted_file_means_the_same_to_a_loader_that_reads_only_its_tensors(case: Case, to: str,
                                                                                tmp_path: Path) -> None:
    """ComfyUI, A1111 and diffusers handed a state dict never see the header: diffusers' own loader on the
    bare tensors, and B·A added in plain torch, must both give the peft model's outputs."""
    out = tmp_path / f"{to}.safetensors"
    convert_lora(case.source, out, to, architecture=case.architecture)
    tensors = load_file(out)
    pipe = tiny_pipeline(case.base, 0)
    pipe.load_lora_weights(dict(tensors))  # a dict has no header: diffusers takes alpha = r
    case.check(case.probe.outputs(pipe.unet, text_encoders(pipe)))
    if to == "diffusers":
        deltas = {tuple(name.split(".", 1)): delta for name, delta in b_times_a(tensors).items()}
        case.check(patched_outputs(case, deltas))
        header = safe_open(out, "pt").metadata()
        config = json.loads(header["lora_adapter_metadata"])
        assert {config[f"{c}.lora_alpha"] for c in case.reference} == {config[f"{c}.r"] for c in case.reference}
        assert all(config[f"{c}.alpha_pattern"] == config[f"{c}.rank_pattern"] for c in case.reference)
        assert json.loads(header["adapterzoo.folded_alpha"])["unet"] == {
            "lora_alpha": 8.0, "alpha_pattern": {"up_blocks.1.resnets.1.conv2": 1.5}}


def test_peft_folder_tensors_alone_mean_what_its_config_says(case: Case, tmp_path: Path) -> None:
    """Each adapter_model.safetensors copied out of the folder is B·A: scale folded, config lora_alpha = r."""
    out = tmp_path / "peft"
    convert_lora(case.source, out, "peft", architecture=case.architecture)
    deltas = {}
    for component in case.reference:
        config = json.loads((out / component / "adapter_config.json").read_text())
        assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
        tensors = load_file(out / component / "adapter_model.safetensors")
        deltas.update({(component, n): d for n, d in b_times_a(tensors, "base_model.model.").items()})
    case.check(patched_outputs(case, deltas))


def test_folding_a_half_precision_lora_rounds_once(tiny_sd1, tmp_path: Path) -> None:
    """fp16 kohya, alpha 8 rank 4 (scale 2: exact) and alpha 3 rank 4 (scale 0.75: lora_B rounds once to fp16,
    about 2e-4 of ΔW, at most half an fp16 ulp per element)."""
    _, arch = tiny_sd1
    g = torch.Generator().manual_seed(2)
    t = {}
    for name, alpha in ((Q, 8.0), (CONV, 3.0)):
        shape = (4, 32) if name == Q else (4, 32, 3, 3)
        t[f"{name}.lora_down.weight"] = torch.randn(*shape, generator=g).half()
        t[f"{name}.lora_up.weight"] = torch.randn(32, 4, *shape[2:] and (1, 1), generator=g).half()
        t[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(t, str(tmp_path / "k.safetensors"))
    convert_lora(tmp_path / "k.safetensors", tmp_path / "d.safetensors", "diffusers", architecture=arch)
    out = load_file(tmp_path / "d.safetensors")
    assert all(v.dtype == torch.float16 for v in out.values())
    got = b_times_a(out, "unet.")
    for name, path, alpha in ((Q, f"{A1}.to_q", 8.0), (CONV, "down_blocks.0.resnets.0.conv1", 3.0)):
        want = (alpha / 4) * t[f"{name}.lora_up.weight"].float().flatten(1) @ t[f"{name}.lora_down.weight"].float().flatten(1)
        error = rel(got[path], want)
        assert error == 0 if alpha == 8.0 else 0 < error <= 5e-4, (path, error)


def test_kohya_names_follow_kohya_for_the_base(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "k.safetensors"
    convert_lora(case.source, out, "kohya", architecture=case.architecture)
    keys = set(load_file(out))
    if case.base == "sdxl":  # kohya trains SDXL on its LDM UNet: input_blocks.4 = down_blocks.1.attentions.0
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.alpha" in keys
        assert {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha",
                "lora_te2_text_model_encoder_layers_0_mlp_fc2.alpha"} <= keys
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in keys
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    with safe_open(out, "pt") as f:
        spec = f.metadata()
    assert spec["modelspec.architecture"].endswith("/lora")
    assert spec["modelspec.implementation"] == ("https://github.com/Stability-AI/generative-models"
                                                if case.base == "sdxl" else "diffusers")


def test_kohya_diffusers_peft_kohya_round_trip_keeps_every_delta(cases, tmp_path: Path) -> None:
    """diffusers and PEFT fold alpha / r into lora_B (fp32, rounded once): deltas agree to fp32 rounding,
    down factors stay bit-identical, and the kohya file at the end carries alpha = r."""
    case = cases["sd1"]
    arch = case.architecture
    first = tmp_path / "a.safetensors"
    convert_lora(case.source, first, "kohya", architecture=arch)
    convert_lora(first, tmp_path / "b.safetensors", "diffusers", architecture=arch)
    convert_lora(tmp_path / "b.safetensors", tmp_path / "c", "peft", architecture=arch)
    convert_lora(tmp_path / "c", tmp_path / "d.safetensors", "kohya", architecture=arch)
    original = load_lora(first, architecture=arch)
    for step in ("b.safetensors", "c", "d.safetensors"):
        again = load_lora(tmp_path / step, architecture=arch)
        assert list(again.modules) == list(original.modules)
        for path, module in original.modules.items():
            assert rel(again.modules[path].delta(), module.delta()) <= 1e-6, (step, path)
    a, d = load_file(first), load_file(tmp_path / "d.safetensors")
    assert a.keys() == d.keys() and all(torch.equal(a[k], d[k]) for k in a if k.endswith("lora_down.weight"))
    assert all(d[k].item() == d[k.replace("alpha", "lora_down.weight")].shape[0] for k in d if k.endswith(".alpha"))


def test_raw_peft_folder_is_read_with_its_alpha_patterns(tiny_sd1, tmp_path: Path) -> None:
    """A folder written by PeftModel.save_pretrained (root layout, one model); rsLoRA, mixed ranks and alphas."""
    _, arch = tiny_sd1
    pipe = tiny_pipeline("sd1", 0)
    probe = Probe("sd1")
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                        target_modules=["to_q", "to_v", "conv1"],
                        rank_pattern={"conv1": 2, "attn2.to_q": 3}, alpha_pattern={"to_v": 1})
    model = PeftModel(pipe.unet, config)
    reference = probe.unet(model)
    model.save_pretrained(tmp_path / "raw")
    out = tmp_path / "d.safetensors"
    convert_lora(tmp_path / "raw", out, "diffusers", architecture=arch)
    fresh = tiny_pipeline("sd1", 0)
    fresh.load_lora_weights(str(out))
    assert rel(probe.unet(fresh.unet), reference) <= TOLERANCE


def test_dora_is_kept_and_matches_peft(tiny_sd1, tmp_path: Path) -> None:
    _, arch = tiny_sd1
    pipe = tiny_pipeline("sd1", 0)
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, use_dora=True, target_modules=["to_q", "conv1"])
    pipe.unet.add_adapter(config)
    for module in pipe.unet.modules():  # a magnitude away from ‖W‖, so DoRA really rescales
        if isinstance(module, BaseTunerLayer):
            module.lora_magnitude_vector["default"].weight.data.mul_(1.5 + torch.rand_like(
                module.lora_magnitude_vector["default"].weight))
    probe = Probe("sd1")
    reference = probe.unet(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                              unet_lora_adapter_metadata=config.to_dict())
    source = tmp_path / "pytorch_lora_weights.safetensors"
    convert_lora(source, tmp_path / "d.safetensors", "diffusers", architecture=arch)
    fresh = tiny_pipeline("sd1", 0)
    fresh.load_lora_weights(str(tmp_path / "d.safetensors"))
    assert rel(probe.unet(fresh.unet), reference) <= TOLERANCE

    convert_lora(source, tmp_path / "k.safetensors", "kohya", architecture=arch)
    assert any(k.endswith(".dora_scale") for k in load_file(tmp_path / "k.safetensors"))
    lora = load_lora(tmp_path / "k.safetensors", architecture=arch)
    merged_by_peft = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            original = module.get_base_layer().weight.detach().clone()
            module.merge()
            merged_by_peft[f"unet.{name}"] = (original, module.get_base_layer().weight.detach())
    assert set(merged_by_peft) == set(lora.modules)
    for path, (original, merged) in merged_by_peft.items():
        ours = original + lora.modules[path].delta(original)
        assert rel(ours, merged) <= 1e-5, path


# -- LyCORIS: deltas by the FORMATS.md formulas, computed here in plain torch --------------------------

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # tiny SD1: Linear 32 -> 32
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # tiny SD1: Conv2d 32 -> 32, 3x3
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # tiny CLIP: Linear 768 -> 768
FC1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # tiny CLIP: Linear 768 -> 64


@pytest.fixture(scope="module")
def tiny_sd1():
    pipe = tiny_pipeline("sd1", 0)
    return pipe, architecture_from_models("sd1", {"unet": pipe.unet, "text_encoder": pipe.text_encoder})


def lycoris_file(path: Path) -> dict[str, torch.Tensor]:
    """LoHa on to_q, Tucker LoCon on a 3x3 conv, LoKr on CLIP's q_proj; expected ΔW (scale included) per module."""
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = {
        f"{Q}.hada_w1_a": r(32, 2), f"{Q}.hada_w1_b": r(2, 32), f"{Q}.hada_w2_a": r(32, 2), f"{Q}.hada_w2_b": r(2, 32),
        f"{Q}.alpha": torch.tensor(1.0),
        f"{CONV}.lora_down.weight": r(3, 32, 1, 1), f"{CONV}.lora_mid.weight": r(3, 3, 3, 3),
        f"{CONV}.lora_up.weight": r(32, 3, 1, 1), f"{CONV}.alpha": torch.tensor(6.0),
        f"{TE_Q}.lokr_w1": r(4, 8), f"{TE_Q}.lokr_w2_a": r(192, 2), f"{TE_Q}.lokr_w2_b": r(2, 96),
        f"{TE_Q}.alpha": torch.tensor(3.0),
    }
    save_file(t, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_dim": "2"})
    expected = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
            (t[f"{Q}.hada_w1_a"] @ t[f"{Q}.hada_w1_b"]) * (t[f"{Q}.hada_w2_a"] @ t[f"{Q}.hada_w2_b"]) * (1.0 / 2),
        "unet.down_blocks.0.resnets.0.conv1": torch.einsum(
            "i j k l, j r, p i -> p r k l", t[f"{CONV}.lora_mid.weight"], t[f"{CONV}.lora_down.weight"][:, :, 0, 0],
            t[f"{CONV}.lora_up.weight"][:, :, 0, 0]) * (6.0 / 3),
        "text_encoder.encoder.layers.0.self_attn.q_proj":
            torch.kron(t[f"{TE_Q}.lokr_w1"], t[f"{TE_Q}.lokr_w2_a"] @ t[f"{TE_Q}.lokr_w2_b"]) * (3.0 / 2),
    }
    return expected


def test_lycoris_deltas_follow_the_formulas_and_pass_through_kohya(tiny_sd1, tmp_path: Path) -> None:
    _, arch = tiny_sd1
    expected = lycoris_file(tmp_path / "ly.safetensors")
    lora = load_lora(tmp_path / "ly.safetensors", architecture=arch)
    assert lora.source_format == "lycoris"
    for path, delta in expected.items():
        assert torch.allclose(lora.modules[path].delta(), delta, rtol=1e-5, atol=1e-5), path
    convert_lora(tmp_path / "ly.safetensors", tmp_path / "k.safetensors", "kohya", architecture=arch)
    a, b = load_file(tmp_path / "ly.safetensors"), load_file(tmp_path / "k.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_lycoris_to_plain_lora_needs_a_rank_then_reports_what_svd_kept(tiny_sd1, tmp_path: Path) -> None:
    pipe, arch = tiny_sd1
    expected = lycoris_file(tmp_path / "ly.safetensors")
    with pytest.raises(AdapterzooError, match="--rank"):
        convert_lora(tmp_path / "ly.safetensors", tmp_path / "d.safetensors", "diffusers", architecture=arch)

    report = convert_lora(tmp_path / "ly.safetensors", tmp_path / "d.safetensors", "diffusers",
                          rank=2, architecture=arch)
    approx = report["approximation"]
    loha = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    s = torch.linalg.svdvals(expected[loha].double())
    assert approx["modules"][loha] == pytest.approx(math.sqrt(float((s[:2] ** 2).sum() / (s ** 2).sum())), rel=1e-5)
    assert "unet.down_blocks.0.resnets.0.conv1" not in approx["modules"]  # Tucker LoCon: exact, mid folded in
    assert 0 < approx["retained_fro"] < 1

    # Full rank (LoHa 2x2 -> <= 4, LoKr 4x2 -> <= 8): exact, and diffusers applies exactly the formula's ΔW.
    convert_lora(tmp_path / "ly.safetensors", tmp_path / "full.safetensors", "diffusers", rank=8, architecture=arch)
    probe = Probe("sd1")
    patched = tiny_pipeline("sd1", 0)
    modules = {f"unet.{n}": m for n, m in patched.unet.named_modules()}
    modules.update({f"text_encoder.{n}": m for n, m in patched.text_encoder.named_modules()})
    with torch.no_grad():
        for path, delta in expected.items():
            modules[path].weight += delta.reshape(modules[path].weight.shape)
    loaded = tiny_pipeline("sd1", 0)
    loaded.load_lora_weights(str(tmp_path / "full.safetensors"))
    assert rel(probe.unet(loaded.unet), probe.unet(patched.unet)) <= TOLERANCE
    assert rel(probe.text(loaded.text_encoder), probe.text(patched.text_encoder)) <= TOLERANCE


def test_early_lycoris_lokr_with_the_kernel_in_both_factors_on_real_sd1(tmp_path: Path) -> None:
    """The issue's layout on SD1's 320x320x3x3 conv: w1 20x60, w2 16x48 (kron 320x2880), read as A1111 and
    ComfyUI read it: kron of the 2-D factors reshaped to the weight; `--rank 4` keeps its best rank-4 part."""
    g = torch.Generator().manual_seed(4)
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    w1, w2_a, w2_b = torch.randn(20, 60, generator=g), torch.randn(16, 4, generator=g), torch.randn(4, 48, generator=g)
    save_file({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2_a, f"{name}.lokr_w2_b": w2_b,
               f"{name}.alpha": torch.tensor(2.0)}, str(tmp_path / "lokr.safetensors"))
    expected = torch.kron(w1, w2_a @ w2_b).reshape(320, 320, 3, 3) * (2.0 / 4)
    lora = load_lora(tmp_path / "lokr.safetensors", base="sd1")
    assert rel(lora.modules["unet.down_blocks.0.resnets.0.conv1"].delta(), expected) <= 1e-6
    report = convert_lora(tmp_path / "lokr.safetensors", tmp_path / "k.safetensors", "kohya", base="sd1", rank=4)
    s = torch.linalg.svdvals(expected.flatten(1).double())
    assert report["approximation"]["retained_fro"] == pytest.approx(float((s[:4].square().sum() / s.square().sum())
                                                                           .sqrt()), rel=1e-5)


def test_ia3_and_full_modules(tiny_sd1, tmp_path: Path) -> None:
    pipe, arch = tiny_sd1
    w = torch.randn(32)
    diff = torch.randn(32, 32)
    save_file({f"{Q}.weight": w, f"{Q}.on_input": torch.tensor(False),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.diff": diff},
              str(tmp_path / "x.safetensors"))
    lora = load_lora(tmp_path / "x.safetensors", architecture=arch)
    weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach()
    ia3 = lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert torch.allclose(weight + ia3.delta(weight), weight * (1 + w)[:, None])
    assert torch.equal(lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"].delta(), diff)
    with pytest.raises(AdapterzooError, match="IA3"):
        convert_lora(tmp_path / "x.safetensors", tmp_path / "y", "peft", rank=4, architecture=arch)


def test_dora_per_input_column_stays_kohya_only(tiny_sd1, tmp_path: Path) -> None:
    """Older LyCORIS DoRA ([1, in]) normalises columns; PEFT's magnitude only scales rows, so no peft/diffusers."""
    pipe, arch = tiny_sd1
    down, up, scale = torch.randn(2, 32), torch.randn(32, 2), 1 + torch.rand(1, 32)
    save_file({f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up, f"{Q}.alpha": torch.tensor(2.0),
               f"{Q}.dora_scale": scale}, str(tmp_path / "dora.safetensors"))
    weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach()
    module = load_lora(tmp_path / "dora.safetensors", architecture=arch).modules[f"unet.{A1}.to_q"]
    merged = weight + up @ down
    assert torch.allclose(weight + module.delta(weight), scale * merged / merged.norm(dim=0, keepdim=True), atol=1e-6)
    with pytest.raises(AdapterzooError, match="input column"):
        convert_lora(tmp_path / "dora.safetensors", tmp_path / "d.safetensors", "diffusers", architecture=arch)
    convert_lora(tmp_path / "dora.safetensors", tmp_path / "k.safetensors", "kohya", architecture=arch)
    assert torch.equal(load_file(tmp_path / "k.safetensors")[f"{Q}.dora_scale"], scale)


# -- names and dialects on the real-size tables (meta device) ----------------------------------------

A1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


@pytest.mark.parametrize(("base", "name", "path"), [  # FORMATS.md §1.2 / §2.1 examples
    ("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("sd1", "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", f"unet.{A1}.to_q"),
    ("sd1", "lora_unet_input_blocks_3_0_op", "unet.down_blocks.0.downsamplers.0.conv"),
    ("sd1", "lora_unet_output_blocks_2_1_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    ("sd1", "lora_unet_output_blocks_5_2_conv", "unet.up_blocks.1.upsamplers.0.conv"),
    ("sd1", "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
     "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("sd1", "lora_te_text_model_encoder_layers_11_mlp_fc1", "text_encoder.encoder.layers.11.mlp.fc1"),
    ("sd1", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder.encoder.layers.0.self_attn.q_proj"),
    ("sd1", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
     "text_encoder.encoder.layers.0.self_attn.q_proj"),
    ("sd2", "lora_te_text_model_encoder_layers_22_mlp_fc1", "text_encoder.encoder.layers.22.mlp.fc1"),
    ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k",
     "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("sdxl", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k",
     "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("sdxl", "lora_unet_middle_block_1_transformer_blocks_9_attn1_to_out_0",
     "unet.mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0"),
    ("sdxl", "lora_unet_output_blocks_0_1_proj_in", "unet.up_blocks.0.attentions.0.proj_in"),
    ("sdxl", "lora_unet_input_blocks_1_0_in_layers_2", "unet.down_blocks.0.resnets.0.conv1"),
    ("sdxl", "lora_unet_input_blocks_1_0_out_layers_3", "unet.down_blocks.0.resnets.0.conv2"),
    ("sdxl", "lora_unet_input_blocks_1_0_emb_layers_1", "unet.down_blocks.0.resnets.0.time_emb_proj"),
    ("sdxl", "lora_unet_input_blocks_4_0_skip_connection", "unet.down_blocks.1.resnets.0.conv_shortcut"),
    ("sdxl", "lora_unet_input_blocks_3_0_op", "unet.down_blocks.0.downsamplers.0.conv"),
    ("sdxl", "lora_unet_output_blocks_2_2_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_mlp_fc1", "text_encoder_2.encoder.layers.31.mlp.fc1"),
    ("sdxl", "text_encoder_2.encoder.layers.31.mlp.fc1", "text_encoder_2.encoder.layers.31.mlp.fc1"),
])
def test_every_spelling_resolves_to_the_real_module(base: str, name: str, path: str) -> None:
    assert builtin_architecture(base).resolve(name).path == path


@pytest.mark.parametrize(("base", "counts"), [("sd1", {"unet": 192, "text_encoder": 72}),
                                             ("sdxl", {"unet": 722, "text_encoder": 72, "text_encoder_2": 192})])
def test_tables_hold_the_module_counts_kohya_trains(base: str, counts: dict[str, int]) -> None:
    """FORMATS.md §1.2: Transformer2DModel children and CLIP attention/MLP projections."""
    kohya = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
             "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "q_proj", "k_proj", "v_proj",
             "out_proj", "fc1", "fc2")
    found: dict[str, int] = {}
    for target in builtin_architecture(base).targets.values():
        if target.path.endswith(kohya):
            found[target.component] = found.get(target.component, 0) + 1
    assert found == counts


def pair(out: int, inn: int, rank: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rank, inn), torch.randn(out, rank)


def test_old_diffusers_dialects_are_read(tmp_path: Path) -> None:
    """Attention-processor keys (a pickled .bin), the transitional form, and old CLIP `to_q_lora` keys."""
    (qd, qu), (od, ou), (vd, vu), (td, tu), (kd, ku) = (pair(320, 320), pair(320, 320), pair(320, 320),
                                                       pair(768, 768), pair(768, 768))
    torch.save({
        f"{A1}.processor.to_q_lora.down.weight": qd, f"{A1}.processor.to_q_lora.up.weight": qu,
        f"unet.{A1}.processor.to_out_lora.down.weight": od, f"unet.{A1}.processor.to_out_lora.up.weight": ou,
        f"unet.{A1}.to_v.lora.down.weight": vd, f"unet.{A1}.to_v.lora.up.weight": vu,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": td,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": tu,
        "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.down.weight": kd,
        "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.up.weight": ku,
    }, tmp_path / "pytorch_lora_weights.bin")
    lora = load_lora(tmp_path / "pytorch_lora_weights.bin")
    assert (lora.base, lora.source_format) == ("sd1", "diffusers-legacy")
    expected = {f"unet.{A1}.to_q": (qd, qu), f"unet.{A1}.to_v": (vd, vu), f"unet.{A1}.to_out.0": (od, ou),
                "text_encoder.encoder.layers.0.self_attn.q_proj": (td, tu),
                "text_encoder.encoder.layers.1.self_attn.k_proj": (kd, ku)}
    assert set(lora.modules) == set(expected)
    for path, (down, up) in expected.items():
        assert torch.allclose(lora.modules[path].delta(), up @ down)  # no alpha in these dialects: scale 1


def test_kohya_ldm_names_and_alphas_on_sd1(tmp_path: Path) -> None:
    (qd, qu), (kd, ku) = pair(320, 320, 4), pair(320, 768, 4)
    save_file({
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": qd,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": qu,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0, dtype=torch.float16),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": kd,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": ku,
    }, str(tmp_path / "ldm.safetensors"), metadata={"ss_network_dim": "4", "sshs_model_hash": "stale"})
    lora = load_lora(tmp_path / "ldm.safetensors")
    assert (lora.base, lora.source_format) == ("sd1", "kohya-ldm")
    assert torch.allclose(lora.modules[f"unet.{A1}.to_q"].delta(), qu @ qd / 4)  # alpha 1, rank 4
    assert torch.allclose(lora.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].delta(),
                          ku @ kd)  # no alpha: scale 1
    report = convert_lora(tmp_path / "ldm.safetensors", tmp_path / "out.safetensors", "kohya")
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert report["modules"] == 2 and f"lora_unet_{A1.replace('.', '_')}_to_q.alpha" in keys
    assert metadata["ss_network_dim"] == "4" and "sshs_model_hash" not in metadata
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"


# -- bad input ------------------------------------------------------------------------------------


def test_keys_that_fit_no_module_are_all_named(tiny_sd1, tmp_path: Path) -> None:
    _, arch = tiny_sd1
    bogus = [f"lora_unet_no_such_block_{i}.lora_down.weight" for i in range(5)]
    tensors = {k: torch.zeros(2, 32) for k in bogus}
    tensors[f"{Q}.lora_down.weight"] = torch.zeros(2, 32)
    tensors[f"{Q}.lora_up.weight"] = torch.zeros(32, 2)
    tensors[f"{FC1}.lora_down.weight"] = torch.zeros(2, 1024)  # an SD2-wide CLIP layer: wrong shape here
    tensors[f"{FC1}.lora_up.weight"] = torch.zeros(64, 2)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UnmatchedKeysError) as info:
        load_lora(tmp_path / "bad.safetensors", architecture=arch)
    assert sorted(info.value.keys) == sorted(bogus + [f"{FC1}.lora_down.weight", f"{FC1}.lora_up.weight"])
    assert "7 key(s)" in str(info.value)
    with pytest.raises(UnmatchedKeysError):
        convert_lora(tmp_path / "bad.safetensors", tmp_path / "out.safetensors", "kohya", architecture=arch)
    assert not (tmp_path / "out.safetensors").exists()


# -- the real files ----------------------------------------------------------------------------------


def sd15_injection_order() -> dict[str, list[tuple[str, torch.nn.Linear]]]:
    """fixtures/real/README.md on a meta SD1.5: per transformer block attn1, ff, attn2; per CLIP layer k, v, q, out."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sd1"])
        te = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIGS["sd1"]["text_encoder"][0]))
    order: dict[str, list] = {"unet": [], "text_encoder": []}
    for name, module in unet.named_modules():
        if type(module).__name__ == "BasicTransformerBlock":
            for attn in ("attn1", "ff", "attn2"):
                children = ("net.0.proj",) if attn == "ff" else ("to_q", "to_k", "to_v", "to_out.0")
                order["unet"] += [(f"{name}.{attn}.{c}", module.get_submodule(f"{attn}.{c}")) for c in children]
    for name, module in te.named_modules():
        if type(module).__name__ == "CLIPAttention":
            projections = ("k_proj", "v_proj", "q_proj", "out_proj")
            order["text_encoder"] += [(f"{name}.{c}", getattr(module, c)) for c in projections]
    return order


@pytest.mark.parametrize("name", ["analog_svd_rank4", "lora_disney"])
def test_real_cloneofsimo_files_land_on_the_right_sd15_modules(name: str, tmp_path: Path) -> None:
    src = tmp_path / f"{name}.safetensors"
    shutil.copy(REAL / src.name, src)
    source = load_file(src)
    convert_lora(src, tmp_path / "k.safetensors", "kohya")
    convert_lora(src, tmp_path / "d.safetensors", "diffusers")
    kohya, diffusers = load_file(tmp_path / "k.safetensors"), load_file(tmp_path / "d.safetensors")
    order = sd15_injection_order()
    assert (len(order["unet"]), len(order["text_encoder"])) == (144, 48)
    for component, entries in order.items():
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        for i, (path, linear) in enumerate(entries):
            down, up = source[f"{component}:{i}:down"], source[f"{component}:{i}:up"]
            rank = down.shape[0]
            assert down.shape == (rank, linear.in_features) and up.shape == (linear.out_features, rank)
            k = prefix + path.replace(".", "_")
            assert torch.equal(kohya[f"{k}.lora_down.weight"], down) and torch.equal(kohya[f"{k}.lora_up.weight"], up)
            assert kohya[f"{k}.alpha"].item() == down.shape[0]  # no alpha in the source: scale 1
            assert torch.equal(diffusers[f"{component}.{path}.lora_A.weight"], down)
            assert torch.equal(diffusers[f"{component}.{path}.lora_B.weight"], up)
    assert len(kohya) == 3 * 192 and len(diffusers) == 2 * 192
    config = json.loads(safe_open(tmp_path / "d.safetensors", "pt").metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == config["unet.lora_alpha"] == source["unet:0:down"].shape[0]


def test_disney_tokens_become_a_diffusers_embedding_file(tmp_path: Path) -> None:
    src = tmp_path / "lora_disney.safetensors"
    shutil.copy(REAL / src.name, src)
    report = convert_lora(src, tmp_path / "k.safetensors", "kohya")
    assert sorted(report["embeddings"]) == ["<s1>", "<s2>"]
    pipe = tiny_pipeline("sd1", 0)  # its CLIP is 768 wide, like SD1.5's
    pipe.load_textual_inversion(list(report["embeddings"].values()))
    table = pipe.text_encoder.get_input_embeddings().weight
    source = load_file(src)
    for token in ("<s1>", "<s2>"):
        assert torch.equal(table[pipe.tokenizer.convert_tokens_to_ids(token)], source[token])
