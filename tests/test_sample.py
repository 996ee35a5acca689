"""`sample`: merge, LoRA Switch, LoRA Composite and AutoLoRA on the run-time engine, checked against plain
renders (hooks set by hand, adapterzoo's weight merge, the model without hooks) at fixed seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import run
from PIL import Image
from safetensors.torch import load_file, save_file
from test_verify import kohya_file, sha256

from adapterzoo import tiny_models
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.probe import probe
from adapterzoo.ops.merge_checkpoint import LoraSpec, merge_checkpoint
from adapterzoo.verify import denoise
from adapterzoo.verify.attach import attach
from adapterzoo.verify.compose import Composition, composed, switch_schedule
from adapterzoo.verify.pipeline_load import load_pipeline
from adapterzoo.verify.sample import SampleOptions, attach_loras, evaluations, render_composed

SIZE = (64, 64)
PROMPT = "a photo of a cat"
STEPS = 3
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers folder, its loaded pipeline, two different kohya LoRAs on every layer, text encoder included)."""
    root = tmp_path_factory.mktemp("sample")
    folder = tiny_models.save_tiny_pipeline("sd1", root / "pipeline", seed=1)
    loaded = load_pipeline(folder, torch.device("cpu"), torch.float32)
    first = kohya_file(loaded.pipe, "sd1", root / "first.safetensors")
    g = torch.Generator().manual_seed(11)
    second = {k: v if k.endswith(".alpha") else torch.randn(v.shape, generator=g) * 0.1
              for k, v in load_file(str(first)).items()}
    save_file(second, str(root / "second.safetensors"))
    return folder, loaded, first, root / "second.safetensors"


@pytest.fixture(scope="module")
def halves(tiny) -> tuple[Path, Path]:
    """`first` split into its UNet part and its text-encoder part."""
    _, _, first, _ = tiny
    tensors = load_file(str(first))
    paths = []
    for part, keep in (("unet", lambda k: k.startswith("lora_unet_")), ("te", lambda k: k.startswith("lora_te_"))):
        paths.append(first.with_name(f"first-{part}.safetensors"))
        save_file({k: v for k, v in tensors.items() if keep(k)}, str(paths[-1]))
    assert sum(len(load_file(str(p))) for p in paths) == len(tensors)
    return paths[0], paths[1]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def options(loras: list[tuple[Path, float]], mode: str = "merge", every: int = 1, gamma: float | None = None,
            steps: int = STEPS) -> SampleOptions:
    return SampleOptions(PROMPT, loras, seed=0, steps=steps, size=SIZE, composition=Composition(mode, every, gamma))


def composed_latents(loaded, folder, opts: SampleOptions) -> torch.Tensor:
    attached = attach_loras(loaded, [path for path, _ in opts.loras], folder)
    return render_composed(loaded, attached, [w for _, w in opts.loras], opts, SIZE)[0]


def plain_latents(loaded, loras: list[tuple[Path, float]], steps: int = STEPS) -> torch.Tensor:
    """The verifier's render: every LoRA hooked at its weight for the whole run (none: the bare model)."""
    attached = [attach(path, probe(path), loaded) for path, _ in loras]
    for one, (_, weight) in zip(attached, loras):
        one.hook().multiplier = weight
    try:
        pipe = loaded.pipe
        positive, negative = (denoise.with_size(pipe, denoise.encode_prompt(pipe, p), SIZE) for p in (PROMPT, ""))
        return denoise.render(pipe, denoise.seeded_noise(pipe, SIZE, 0), steps,
                              denoise.guided(pipe.unet, positive, negative))[0]
    finally:
        for one in attached:
            one.remove()


def test_switch_and_composite_with_one_lora_equal_the_plain_lora(tiny):
    folder, loaded, first, _ = tiny
    plain = plain_latents(loaded, [(first, 0.8)])
    assert relative(plain, plain_latents(loaded, [])) > 0.01
    for mode in ("merge", "switch", "composite"):
        assert relative(composed_latents(loaded, folder, options([(first, 0.8)], mode)), plain) < TOLERANCE, mode


def test_composite_of_three_copies_of_one_lora_equals_it(tiny, halves):
    folder, loaded, _, _ = tiny
    unet_part, _ = halves
    latents = composed_latents(loaded, folder, options([(unet_part, 0.8)] * 3, "composite"))
    assert relative(latents, plain_latents(loaded, [(unet_part, 0.8)])) < TOLERANCE


def test_text_encoder_loras_act_merge_style_in_composite(tiny, halves):
    """The prompt is encoded once with every LoRA on: three copies put the text-encoder part in three times."""
    folder, loaded, first, _ = tiny
    unet_part, te_part = halves
    latents = composed_latents(loaded, folder, options([(first, 0.8)] * 3, "composite"))
    assert relative(latents, plain_latents(loaded, [(unet_part, 0.8), (te_part, 2.4)])) < TOLERANCE
    assert relative(latents, plain_latents(loaded, [(first, 0.8)])) > 1e-3


def test_composite_of_two_loras_is_neither_nor_their_merge(tiny):
    folder, loaded, first, second = tiny
    loras = [(first, 0.8), (second, 0.8)]
    latents = composed_latents(loaded, folder, options(loras, "composite"))
    for other in (plain_latents(loaded, loras), plain_latents(loaded, loras[:1]), plain_latents(loaded, loras[1:])):
        assert relative(latents, other) > 1e-3


def test_autolora_gamma_0_is_the_bare_model_and_gamma_1_the_plain_lora(tiny):
    folder, loaded, first, _ = tiny
    bare = plain_latents(loaded, [])
    assert torch.equal(composed_latents(loaded, folder, options([(first, 0.8)], gamma=0.0)), bare)
    plain = plain_latents(loaded, [(first, 0.8)])
    assert relative(composed_latents(loaded, folder, options([(first, 0.8)], gamma=1.0)), plain) < TOLERANCE
    half = composed_latents(loaded, folder, options([(first, 0.8)], gamma=0.5))
    assert relative(half, bare) > 1e-3 and relative(half, plain) > 1e-3


def test_merge_of_two_loras_equals_adapterzoos_merge_into_the_weights(tiny, tmp_path):
    folder, loaded, first, second = tiny
    loras = [(first, 0.7), (second, -0.4)]
    merge_checkpoint(folder, [LoraSpec(path, weight) for path, weight in loras], tmp_path / "merged", sha256=sha256)
    reference = plain_latents(load_pipeline(tmp_path / "merged", torch.device("cpu"), torch.float32), [])
    assert relative(reference, plain_latents(loaded, [])) > 0.01
    assert relative(composed_latents(loaded, folder, options(loras)), reference) < TOLERANCE


@pytest.mark.parametrize("count, every, expected", [
    (2, 1, [0, 1, 0]),
    (2, 2, [0, 0, 1, 1, 0]),
    (3, 2, [0, 0, 1, 1, 2]),
    (3, 1, [0, 1, 2, 0]),
])
def test_the_switch_schedule_step_by_step(tiny, count, every, expected):
    """Per UNet call, which LoRAs are live (multiplier ≠ 0) and did every one of the live LoRA's UNet layers run.
    The tiny SD1 samples with PNDM, whose first step is two passes: n steps are n + 1 passes, each one switch step."""
    folder, loaded, first, second = tiny
    steps = len(expected) - 1
    assert evaluations(loaded, steps) == len(expected)
    assert switch_schedule(len(expected), count, every) == expected
    loras = [(first, 0.5), (second, 1.0), (first, 1.5)][:count]
    opts = options(loras, "switch", every, steps=steps)
    attached = attach_loras(loaded, [path for path, _ in loras], folder)
    seen: list[list[int]] = []
    before: dict[int, dict[str, int]] = {}

    def pre(module, args):
        before.update({i: dict(one.handle.calls) for i, one in enumerate(attached)})

    def post(module, args, output):
        live = [i for i, one in enumerate(attached) if one.handle.multiplier != 0]
        seen.append(live)
        for i in live:
            calls = attached[i].handle.calls
            assert all(calls[p] > before[i][p] for p in calls if p.startswith("unet.")), (len(seen), i)

    hooks = [loaded.pipe.unet.register_forward_pre_hook(pre), loaded.pipe.unet.register_forward_hook(post)]
    try:
        render_composed(loaded, attached, [w for _, w in loras], opts, SIZE)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [[i] for i in expected]


def test_each_switch_step_predicts_what_its_lora_alone_predicts(tiny):
    """The noise prediction at step s equals LoRA i(s)'s own guided prediction at the same latents."""
    folder, loaded, first, second = tiny
    weights = [0.6, 1.2]
    attached = attach_loras(loaded, [first, second], folder)
    handles = [one.hook() for one in attached]
    pipe = loaded.pipe
    try:
        for handle, weight in zip(handles, weights):
            handle.multiplier = weight
        pair = tuple(denoise.with_size(pipe, denoise.encode_prompt(pipe, p), SIZE) for p in (PROMPT, ""))
        predict = composed(pipe.unet, handles, weights, Composition("switch", 2), pair)
        latents = denoise.seeded_noise(pipe, SIZE, 5)
        t = torch.tensor(500)
        for step, alone in enumerate([0, 0, 1, 1, 0]):
            ours = predict(step, latents, t)
            for i, handle in enumerate(handles):
                handle.multiplier = weights[i] if i == alone else 0.0
            assert torch.equal(ours, denoise.guided(pipe.unet, *pair)(step, latents, t)), step
            handles[1 - alone].multiplier = weights[1 - alone]
            assert not torch.equal(ours, denoise.guided(pipe.unet, *pair)(step, latents, t)), step
    finally:
        for one in attached:
            one.remove()


def test_sdxl_two_text_encoders_and_size_conditioning(tmp_path):
    """SDXL: both encoders' LoRA parts and the pooled / size conditioning go through every mode alike."""
    folder = tiny_models.save_tiny_pipeline("sdxl", tmp_path / "pipeline", seed=1)
    loaded = load_pipeline(folder, torch.device("cpu"), torch.float32)
    lora = kohya_file(loaded.pipe, "sdxl", tmp_path / "xl.safetensors")
    plain = plain_latents(loaded, [(lora, 0.8)], steps=2)
    bare = plain_latents(loaded, [], steps=2)
    assert relative(plain, bare) > 0.01
    for mode in ("switch", "composite"):
        assert relative(composed_latents(loaded, folder, options([(lora, 0.8)], mode, steps=2)), plain) < TOLERANCE
    assert torch.equal(composed_latents(loaded, folder, options([(lora, 0.8)], gamma=0.0, steps=2)), bare)


def test_a_lora_for_another_base_or_not_a_lora_is_refused_in_one_line(tiny, tmp_path):
    folder, loaded, _, _ = tiny
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}, str(sdxl))
    with pytest.raises(AdapterzooError, match=r"^sdxl LoRA, sd1 checkpoint: sdxl.safetensors does not fit pipeline$"):
        attach_loras(loaded, [sdxl], folder)
    embedding = tmp_path / "style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(1, 768)}}, embedding)
    refused = r"^style.pt is not a LoRA or LyCORIS file \(probe says embedding\); --lora takes those only$"
    with pytest.raises(AdapterzooError, match=refused):
        attach_loras(loaded, [embedding], folder)


# -- the command line ---------------------------------------------------------------------------------------


def test_cli_writes_a_png_with_its_parameters_and_refuses_to_overwrite_it(tiny, tmp_path, capsys, monkeypatch):
    folder, _, first, second = tiny
    out = tmp_path / "out.png"
    args = ["sample", "--checkpoint", str(folder), "--lora", f"{first}:0.8", "--lora", str(second),
            "--prompt", PROMPT, "--negative-prompt", "blurry", "--seed", "7", "-o", str(out),
            "--compose", "switch", "--switch-every", "2", "--autolora", "1.5", "--steps", "3", "--size", "64x48"]
    code, stdout, err = run([*args, "--json"], capsys, monkeypatch)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["output"] == str(out) and report["seconds"] > 0
    assert (report["compose"], report["schedule"], report["autolora"]) == ("switch", [0, 0, 1, 1], 1.5)
    assert [(r["file"], r["weight"]) for r in report["loras"]] == [(str(first), 0.8), (str(second), 1.0)]
    assert all(r["modules_hit"] == r["modules"] == 125 for r in report["loras"])
    image = Image.open(out)
    assert image.size == (64, 48)
    prompt, negative, fields = image.text["parameters"].split("\n")
    assert (prompt, negative) == (PROMPT, "Negative prompt: blurry")
    assert fields.startswith("Steps: 3, Sampler: PNDMScheduler, CFG scale: 7.0, Seed: 7, Size: 64x48, Model: pipeline")
    assert '"first.safetensors:0.8, second.safetensors:1"' in fields
    assert f'LoRA SHA256: "{sha256(first)}, {sha256(second)}"' in fields
    assert "Compose: switch, Switch every: 2, AutoLoRA: 1.5" in fields

    written = out.read_bytes()
    code, stdout, err = run(args, capsys, monkeypatch)
    assert (code, stdout, err) == (1, "", f"error: {out} already exists; pass --force to replace it\n")
    assert out.read_bytes() == written


@pytest.mark.parametrize("extra, code, message", [
    (["--size", "64"], 2, "Invalid value for '--size': '64' is not WxH (e.g. 512x512)"),
    (["--size", "60x64"], 1, "error: --size 60x64: the size must be a multiple of 8"),
    (["--switch-every", "2"], 2, "Error: --switch-every is for --compose switch"),
    (["--autolora", "nan"], 2, "Error: --autolora takes a finite number"),
])
def test_cli_refuses_bad_sizes_and_nonsense_combinations(tiny, tmp_path, capsys, monkeypatch, extra, code, message):
    folder, _, first, _ = tiny
    args = ["sample", "--checkpoint", str(folder), "--lora", str(first), "--prompt", PROMPT,
            "-o", str(tmp_path / "out.png"), "--steps", "1", *extra]
    got, stdout, err = run(args, capsys, monkeypatch)
    assert (got, stdout) == (code, "")
    assert err.strip().splitlines()[-1].endswith(message)  # click's usage lines, then the reason in one line
    assert not (tmp_path / "out.png").exists()
