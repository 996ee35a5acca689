"""`verify`: adapters applied at run time must equal diffusers' own loader (or merged weights), leave the
model bit-identical at multiplier 0, and every file that does nothing must fail with its reason."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import diffusers
import factory
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from cli_helpers import run
from PIL import Image
from safetensors.torch import load_file, save_file
from test_merge_checkpoint import lycoris_files
from transformers import CLIPTextConfig, CLIPTextModel

from adapterzoo import tiny_models
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint
from adapterzoo.formats.convert import convert
from adapterzoo.formats.lora.lora_read import load_lora, load_lora_matched
from adapterzoo.formats.model.architectures import architecture_from_models
from adapterzoo.formats.probe import probe
from adapterzoo.ops.merge_checkpoint import LoraSpec, merge_checkpoint
from adapterzoo.verify import denoise
from adapterzoo.verify.attach import attach
from adapterzoo.verify.pipeline_load import LoadedPipeline
from adapterzoo.verify.runtime_lora import apply_lora, live_modules
from adapterzoo.verify.verifier import Verifier, VerifyOptions
from adapterzoo.zoo import db
from adapterzoo.zoo.models import Verification

SIZE = (64, 64)
PROMPT = "a photo of a cat"
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def components(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None}


def kohya_file(pipe, base: str, path: Path, std: float = 0.1, zero_up: bool = False) -> Path:
    """A kohya LoRA on every Linear / Conv2d of the tiny model (alpha 2, rank 4)."""
    arch = architecture_from_models(base, components(pipe))
    g = torch.Generator().manual_seed(3)
    sd = {}
    for target in arch.targets.values():
        if len(target.shape) < 2 or "embedding" in target.path or "text_projection" in target.path:
            continue
        name = arch.kohya_name(target)
        tail = target.shape[2:]
        sd[f"{name}.lora_down.weight"] = torch.randn(4, *target.shape[1:], generator=g) * std
        up = torch.randn(target.shape[0], 4, *(1,) * len(tail), generator=g) * std
        sd[f"{name}.lora_up.weight"] = torch.zeros_like(up) if zero_up else up
        sd[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(path))
    return path


def noise_prediction(pipe, prompt: str = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        cond = denoise.with_size(pipe, denoise.encode_prompt(pipe, prompt), SIZE)
        return denoise.unet_prediction(pipe.unet, denoise.seeded_noise(pipe, SIZE, 0), torch.tensor(500), cond)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("base", ["sd1", "sdxl"])
def test_kohya_at_run_time_equals_diffusers_load_lora_weights(base, tmp_path):
    pipe = tiny_models.tiny_pipeline(base, 1)
    lora_path = kohya_file(pipe, base, tmp_path / "kohya.safetensors")
    baseline = noise_prediction(pipe)
    lora, unmatched, _ = load_lora_matched(lora_path, architecture_from_models(base, components(pipe)))
    assert unmatched == []
    applied = apply_lora(lora, live_modules(components(pipe), lora.architecture, list(lora.modules)), 0.7)
    ours = noise_prediction(pipe)
    applied.multiplier = 0.0
    assert torch.equal(noise_prediction(pipe), baseline)
    applied.remove()
    assert torch.equal(noise_prediction(pipe), baseline)
    assert all(calls > 0 for calls in applied.calls.values())

    pipe.load_lora_weights(str(lora_path), adapter_name="k")
    pipe.set_adapters(["k"], [0.7])
    theirs = noise_prediction(pipe)
    assert relative(theirs, baseline) > 0.05
    assert relative(ours, theirs) < TOLERANCE


# -- the Verifier on a tiny SD1 folder --------------------------------------------------------------


def sha256(path: Path) -> str | dict[str, str]:
    """What the CLI's hasher answers: a file's digest, a folder's per file."""
    path = Path(path)
    if path.is_dir():
        return {f.relative_to(path).as_posix(): sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Verifier]:
    folder = tiny_models.save_tiny_pipeline("sd1", tmp_path_factory.mktemp("sd1") / "pipeline", seed=1)
    return folder, Verifier(folder, VerifyOptions(steps=2, size=SIZE), sha256)


def test_a_kohya_lora_passes_and_multiplier_zero_is_the_model_without_it(tiny, tmp_path):
    folder, verifier = tiny
    path = kohya_file(tiny_models.tiny_pipeline("sd1", 1), "sd1", tmp_path / "kohya.safetensors")
    result = verifier.verify(path, tmp_path / "grid.png")
    assert (result["verdict"], result["reasons"]) == ("pass", [])
    assert result["coverage"] == {"keys_total": 375, "keys_matched": 375, "modules_total": 125, "modules_hit": 125,
                                  "unmatched": []}
    zero, half, one = result["effects"]
    assert (zero["mean_abs_pixel_change"], zero["noise_pred_rel_change"]) == (0.0, 0.0)
    assert 0 < half["noise_pred_rel_change"] < one["noise_pred_rel_change"]
    assert one["mean_abs_pixel_change"] > 1
    assert (result["sha256"], result["checkpoint_sha256"]) == (sha256(path), result["parameters"]["checkpoint_sha256"])

    text = Image.open(tmp_path / "grid.png").text["parameters"]
    first, second = text.split("\n")
    assert first == "a photo of a cat"
    assert second.startswith("Steps: 2, Sampler: PNDMScheduler, CFG scale: 7.0, Seed: 0, Size: 64x64")
    assert f"File SHA256: {sha256(path)}" in second and "Multipliers: 0, 0.5, 1" in second
    assert f"diffusers {diffusers.__version__}" in second
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * SIZE[0]


def test_a_lora_whose_every_up_is_zero_fails_with_no_effect(tiny, tmp_path):
    path = kohya_file(tiny_models.tiny_pipeline("sd1", 1), "sd1", tmp_path / "zero.safetensors", zero_up=True)
    result = tiny[1].verify(path, None)
    assert (result["verdict"], result["reasons"]) == ("fail", ["no effect: every lora_up is zero"])
    assert all(e["noise_pred_rel_change"] == 0 for e in result["effects"])


def test_multiplier_zero_alone_is_no_effect(tiny, tmp_path):
    folder, _ = tiny
    verifier = Verifier(folder, VerifyOptions(steps=1, multipliers=[0.0]), sha256)
    assert verifier.size == SIZE  # the model's own: UNet sample size 8 x VAE factor 8
    path = kohya_file(tiny_models.tiny_pipeline("sd1", 1), "sd1", tmp_path / "kohya.safetensors")
    assert verifier.verify(path, None)["reasons"] == ["no effect: the multiplier is 0"]


def test_nan_in_a_file_fails_and_a_stray_key_is_counted_and_named(tiny, tmp_path):
    path = kohya_file(tiny_models.tiny_pipeline("sd1", 1), "sd1", tmp_path / "kohya.safetensors")
    sd = load_file(str(path))
    key = next(k for k in sd if k.endswith("attn2_to_k.lora_up.weight"))
    sd[key][0, 0] = float("nan")
    sd["lora_unet_nowhere_block.lora_down.weight"] = torch.zeros(4, 8)
    save_file(sd, str(path))
    result = tiny[1].verify(path, None)
    assert result["verdict"] == "fail"
    assert result["coverage"]["unmatched"] == ["lora_unet_nowhere_block.lora_down.weight"]
    assert result["coverage"]["keys_matched"] == result["coverage"]["keys_total"] - 1 == 375
    assert result["reasons"][0].startswith("NaN or inf in the file's tensors (1 module(s), e.g. unet.")
    assert result["reasons"][1] == ("1 key(s) land on no module of the checkpoint: "
                                    "lora_unet_nowhere_block.lora_down.weight")
    assert "the noise prediction holds NaN or inf" in result["reasons"]


def test_a_module_whose_name_fits_and_shape_does_not_is_a_named_failure(tiny, tmp_path):
    path = kohya_file(tiny_models.tiny_pipeline("sd1", 1), "sd1", tmp_path / "kohya.safetensors")
    sd = load_file(str(path))
    module = next(k for k in sd if k.endswith("attn2_to_k.lora_down.weight")).removesuffix(".lora_down.weight")
    sd[f"{module}.lora_down.weight"] = torch.ones(4, 999)
    save_file(sd, str(path))
    result = tiny[1].verify(path, None)
    assert result["verdict"] == "fail"
    assert any(r.startswith("3 key(s) name modules of the checkpoint but not their shapes (e.g. " + module)
               and "file" in r and "×999" in r for r in result["reasons"]), result["reasons"]


def test_a_file_for_another_base_is_refused_before_rendering(tiny, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}, str(path))
    with pytest.raises(AdapterzooError, match=r"^sdxl LoRA, sd1 checkpoint: sdxl.safetensors does not fit pipeline$"):
        tiny[1].verify(path, None)


def legacy_lora(unet: torch.nn.Module, path: Path) -> Path:
    """What `unet.save_attn_procs` wrote in early 2023: `<attn>.processor.to_q_lora.down.weight`, no prefix."""
    g = torch.Generator().manual_seed(4)
    sd = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1", "attn2")):
            for proj, saved in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"),
                                ("to_out.0", "to_out_lora")):
                layer = module.get_submodule(proj)
                sd[f"{name}.processor.{saved}.down.weight"] = torch.randn(4, layer.in_features, generator=g) * 0.1
                sd[f"{name}.processor.{saved}.up.weight"] = torch.randn(layer.out_features, 4, generator=g) * 0.1
    save_file(sd, str(path))
    return path


def test_a_legacy_diffusers_lora_that_diffusers_ignores_passes_with_us(tiny, tmp_path):
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    path = legacy_lora(pipe.unet, tmp_path / "pytorch_lora_weights.safetensors")
    baseline = noise_prediction(pipe)
    pipe.load_lora_into_unet(load_file(str(path)), network_alphas=None, unet=pipe.unet)
    assert torch.equal(noise_prediction(pipe), baseline)  # diffusers loaded nothing, and said nothing

    result = tiny[1].verify(path, None)
    assert (result["format"], result["verdict"]) == ("diffusers-legacy", "pass")
    assert result["coverage"]["modules_hit"] == result["coverage"]["modules_total"] == len(load_file(str(path))) // 2
    assert result["effects"][-1]["noise_pred_rel_change"] > 0.01


def test_an_embedding_passes_and_multiplier_zero_is_the_prompt_without_its_token(tiny, tmp_path):
    path = tmp_path / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768) * 0.5},
                "name": "my-style", "step": 10}, path)
    result = tiny[1].verify(path, None)
    assert (result["kind"], result["verdict"], result["reasons"]) == ("embedding", "pass", [])
    assert result["parameters"]["prompts"] == ["a photo of my-style"]
    assert result["effects"][0]["noise_pred_rel_change"] == 0
    assert result["coverage"]["modules_hit"] == result["coverage"]["modules_total"] == 1


def test_a_hypernetwork_passes_and_a_width_no_attention_reads_is_named(tiny, tmp_path):
    g = torch.Generator().manual_seed(6)

    def module(width: int) -> dict[str, torch.Tensor]:
        return {"linear.0.weight": torch.randn(2 * width, width, generator=g) * 0.1,
                "linear.0.bias": torch.zeros(2 * width),
                "linear.2.weight": torch.randn(width, 2 * width, generator=g) * 0.1,
                "linear.2.bias": torch.zeros(width)}

    fields = {"name": "hn", "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
              "activate_output": False, "use_dropout": False}
    path = tmp_path / "hn.pt"
    torch.save({768: (module(768), module(768)), 32: (module(32), module(32)), **fields}, path)
    result = tiny[1].verify(path, None)
    assert (result["kind"], result["verdict"], result["reasons"]) == ("hypernetwork", "pass", [])
    # 6 transformer blocks: every attn2 reads 768; the attn1 of the 5 in 32-wide blocks (mid block is 64) read 32
    assert result["coverage"]["modules_hit"] == result["coverage"]["modules_total"] == 11
    assert result["effects"][-1]["noise_pred_rel_change"] > 0.01

    torch.save({768: (module(768), module(768)), 320: (module(320), module(320)), **fields}, path)
    result = tiny[1].verify(path, None)
    assert result["coverage"]["unmatched"] == ["width 320 (no attention of this checkpoint reads a context that wide)"]
    assert result["coverage"]["keys_matched"] == 8 and result["verdict"] == "fail"


def hooked_prediction(pipe, base: str, lora_path: Path, multiplier: float) -> torch.Tensor:
    lora, unmatched, _ = load_lora_matched(lora_path, architecture_from_models(base, components(pipe)))
    assert unmatched == []
    applied = apply_lora(lora, live_modules(components(pipe), lora.architecture, list(lora.modules)), multiplier)
    try:
        return noise_prediction(pipe)
    finally:
        applied.remove()


def test_lycoris_and_dora_at_run_time_equal_adapterzoos_merged_weights(tiny, tmp_path):
    """LoHa, LoKr, IA3, full diff, norm diffs, Tucker LoCon, both DoRA axes (test_merge_checkpoint checks the
    merge against plain-torch formulas)."""
    folder, _ = tiny
    _, lycoris, _ = lycoris_files(tmp_path)
    merged = tmp_path / "merged"
    merge_checkpoint(folder, [LoraSpec(lycoris, 0.6)], merged, sha256=sha256)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    baseline = noise_prediction(pipe)
    ours = hooked_prediction(pipe, "sd1", lycoris, 0.6)
    reference = noise_prediction(StableDiffusionPipeline.from_pretrained(merged, local_files_only=True))
    assert relative(reference, baseline) > 0.01
    assert relative(ours, reference) < TOLERANCE


def test_the_real_cloneofsimo_file_lands_by_position_and_equals_merged_weights(tmp_path):
    """The real SD1.5 file on a model of SD1.5 widths with fewer blocks: the pairs that have their layer act
    exactly like W + up @ down (no alpha: scale 1); the pairs whose layer is missing are listed."""
    torch.manual_seed(2)
    unet = UNet2DConditionModel(block_out_channels=(320, 640), layers_per_block=1, cross_attention_dim=768,
                                down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, attention_head_dim=8, sample_size=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=1, num_attention_heads=12, eos_token_id=999))
    pipe = StableDiffusionPipeline(tiny_models.tiny_vae(), text_encoder, tiny_models.tiny_tokenizer(), unet,
                                   tiny_models.tiny_scheduler("sd1"), None, None, requires_safety_checker=False)
    loaded = LoadedPipeline(pipe, "sd1", architecture_from_models("sd1", components(pipe)))
    path = factory.REAL / "analog_svd_rank4.safetensors"
    attached = attach(path, probe(path), loaded)
    baseline = noise_prediction(pipe)
    attached.hook()
    ours = noise_prediction(pipe)
    attached.remove()
    assert torch.equal(noise_prediction(pipe), baseline)

    reference_lora = load_lora(path, base="sd1")
    landed = {p: m for p, m in reference_lora.modules.items() if f"{p} (no such layer in the checkpoint)"
              not in attached.coverage["unmatched"]}
    assert len(landed) == attached.coverage["modules_total"] == 22  # 2 transformer blocks x 9, 4 in CLIP layer 0
    assert attached.coverage["keys_matched"] == 2 * 22
    with torch.no_grad():
        for target, module in landed.items():
            component, _, rest = target.partition(".")
            layer = components(pipe)[component].get_submodule(rest)
            layer.weight += (module.up.double() @ module.down.double()).reshape(layer.weight.shape).float()
    reference = noise_prediction(pipe)
    assert relative(reference, baseline) > 1e-3
    assert relative(ours, reference) < TOLERANCE


# -- the command line and the registry -------------------------------------------------------------------


def test_cli_verifies_several_files_records_each_and_list_filters_by_verdict(tiny, tmp_path, capsys, monkeypatch):
    folder, _ = tiny
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    good = kohya_file(pipe, "sd1", tmp_path / "good.safetensors")
    zero = kohya_file(pipe, "sd1", tmp_path / "zero.safetensors", zero_up=True)
    never = tmp_path / "never.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(1, 768)}}, never)
    args = ["verify", str(good), str(zero), "--checkpoint", str(folder), "-o", str(tmp_path / "grid.png"),
            "--steps", "1", "--size", "64x64", "--multiplier", "0", "--multiplier", "1", "--json"]
    code, out, err = run(args, capsys, monkeypatch)
    assert code == 1, err
    results = json.loads(out)
    assert [r["verdict"] for r in results] == ["pass", "fail"]
    assert [Path(r["grid"]).name for r in results] == ["grid-good.png", "grid-zero.png"]
    assert all(Path(r["grid"]).is_file() for r in results)
    assert set(results[0]) == {"file", "sha256", "kind", "base", "format", "checkpoint", "checkpoint_sha256",
                               "verdict", "reasons", "coverage", "effects", "grid", "seconds", "parameters",
                               "version", "quick"}
    assert run(["scan", str(never)], capsys, monkeypatch)[0] == 0

    def listed(*extra: str) -> list[str]:
        code, out, _ = run(["list", "--json", *extra], capsys, monkeypatch)
        assert code == 0
        return sorted(Path(r["path"]).name for r in json.loads(out))

    assert listed("--verdict", "pass") == ["good.safetensors"]
    assert listed("--verdict", "fail") == ["zero.safetensors"]
    assert listed("--verdict", "never") == ["never.pt"]
    code, out, _ = run(["list"], capsys, monkeypatch)
    assert "VERIFIED" in out.splitlines()[0]
    assert [line.split()[-2] for line in out.splitlines()[1:]] == ["pass", "-", "fail"]

    code, out, _ = run(["show", str(zero), "--json"], capsys, monkeypatch)
    shown = json.loads(out)["verification"]
    assert (shown["verdict"], shown["reasons"]) == ("fail", ["no effect: every lora_up is zero"])
    assert shown["coverage"] == results[1]["coverage"] and shown["effects"] == results[1]["effects"]
    assert shown["checkpoint_sha256"] == results[1]["checkpoint_sha256"]
    code, out, _ = run(["show", str(zero)], capsys, monkeypatch)
    assert "verified       fail on" in out and "- no effect: every lora_up is zero" in out


def test_cli_refuses_a_file_of_another_base_in_one_line(tiny, tmp_path, capsys, monkeypatch):
    path = tmp_path / "sdxl_emb.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(path))
    code, out, err = run(["verify", str(path), "--checkpoint", str(tiny[0]), "--size", "64x64"], capsys, monkeypatch)
    assert (code, out) == (1, "")
    assert err == "error: sdxl embedding, sd1 checkpoint: sdxl_emb.safetensors does not fit pipeline\n"


def test_an_older_registry_gets_the_new_verification_columns(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT NOT NULL)")
        connection.execute("CREATE TABLE verifications (id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL, "
                           "checkpoint TEXT NOT NULL, verdict TEXT NOT NULL, coverage DOUBLE PRECISION, "
                           "effect DOUBLE PRECISION, grid_path TEXT, created TIMESTAMP NOT NULL)")
        connection.execute("INSERT INTO verifications VALUES (1, 1, 'ckpt', 'pass', 1.0, 2.0, NULL, '2025-01-01')")
    db.connect(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(verifications)")]
        row = connection.execute("SELECT reasons, effects, parameters, version, quick FROM verifications").fetchone()
    assert columns == [c.name for c in Verification.__table__.columns]
    assert row == ("[]", "[]", "{}", None, 0)  # an older run rendered its grid: not quick


# -- other kinds and single files ---------------------------------------------------------------------------


def test_a_vae_decodes_the_checkpoints_latents_beside_its_own(tiny, tmp_path):
    torch.manual_seed(0)
    tiny_models.tiny_vae().save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    result = tiny[1].verify(path, tmp_path / "vae.png")
    assert (result["kind"], result["verdict"], result["reasons"]) == ("vae", "pass", [])
    assert result["effects"][0]["mean_abs_pixel_change"] > 1  # other weights than the checkpoint's VAE
    assert Image.open(tmp_path / "vae.png").size[0] > 2 * SIZE[0]


def test_an_sdxl_embedding_fills_both_text_encoders(tmp_path_factory, tmp_path):
    folder = tiny_models.save_tiny_pipeline("sdxl", tmp_path_factory.mktemp("sdxl") / "pipeline", seed=1)
    verifier = Verifier(folder, VerifyOptions(steps=1, size=SIZE, multipliers=[0.0, 1.0]), sha256)
    path = tmp_path / "xl-style.safetensors"
    save_file({"clip_l": torch.randn(2, 768) * 0.5, "clip_g": torch.randn(2, 1280) * 0.5}, str(path))
    result = verifier.verify(path, None)
    assert (result["base"], result["verdict"], result["reasons"]) == ("sdxl", "pass", [])
    assert result["coverage"]["modules_hit"] == result["coverage"]["modules_total"] == 2
    assert verifier.base == "sdxl"


def test_a_single_file_checkpoint_loads_offline_and_verifies_itself_and_a_lora(tmp_path):
    """Our converter makes the pipeline (CLIP's real vocabulary, so the shipped tokenizer fits)."""
    pipe = tiny_models.tiny_pipeline("sd1", 1)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=64, num_hidden_layers=1, num_attention_heads=12,
        hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    pipe.to(torch.float16).save_pretrained(tmp_path / "pipeline")  # half the bytes of a 49408-token table
    single = tmp_path / "tiny.safetensors"
    convert_checkpoint(tmp_path / "pipeline", single, "ldm", dtype="fp16")
    verifier = Verifier(single, VerifyOptions(steps=1, size=SIZE), sha256)
    assert verifier.base == "sd1" and verifier.checkpoint_sha256 == sha256(single)
    lora = kohya_file(pipe, "sd1", tmp_path / "kohya.safetensors")
    assert verifier.verify(lora, None)["verdict"] == "pass"
    itself = verifier.verify(single, tmp_path / "itself.png")
    assert (itself["kind"], itself["verdict"], itself["effects"]) == ("checkpoint", "pass", [])
    assert "Multipliers: none" in Image.open(tmp_path / "itself.png").text["parameters"]


def test_a_peft_folder_verifies_like_the_kohya_file_it_was_converted_from(tiny, tmp_path):
    folder, verifier = tiny
    kohya = kohya_file(tiny_models.tiny_pipeline("sd1", 1), "sd1", tmp_path / "kohya.safetensors")
    convert(kohya, tmp_path / "peft", "peft", checkpoint=folder)
    from_kohya, from_peft = verifier.verify(kohya, None), verifier.verify(tmp_path / "peft", None)
    assert (from_peft["format"], from_peft["verdict"]) == ("peft", "pass"), from_peft["reasons"]
    assert from_peft["coverage"]["modules_hit"] == from_kohya["coverage"]["modules_hit"] == 125
    for a, b in zip(from_peft["effects"], from_kohya["effects"]):
        assert a["noise_pred_rel_change"] == pytest.approx(b["noise_pred_rel_change"], rel=1e-4)
