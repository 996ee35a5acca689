"""`merge`: LoRAs into a checkpoint must give what diffusers gives after `load_lora_weights` + `fuse_lora`,
in a diffusers folder and (read back with `from_single_file`) in a single file; LyCORIS and DoRA modules
must give the FORMATS.md formulas written out here in plain torch; bad inputs write nothing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import factory
import pytest
import torch
from cli_helpers import run
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterzoo import tiny_models
from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.checkpoint.checkpoint_convert import convert_checkpoint
from adapterzoo.formats.checkpoint_targets import checkpoint_targets
from adapterzoo.formats.convert import convert
from adapterzoo.formats.io import direct_io
from adapterzoo.formats.lora.lora_read import UnmatchedKeysError
from adapterzoo.formats.model import unet_names
from adapterzoo.formats.model.architectures import builtin_architecture
from adapterzoo.formats.probe import probe
from adapterzoo.ops import merge_checkpoint as merging
from adapterzoo.ops.extract import extract_lora
from adapterzoo.ops.merge_checkpoint import LoraSpec, UnmatchedLoraKeysError, merge_checkpoint

PIPELINE = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")
WEIGHTS = (0.7, -0.4)
TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sha256(path: Path) -> str | dict[str, str]:
    """hashlib's digest of a file; a folder's per file, by relative path (what ops.provenance.Hasher returns)."""
    path = Path(path)
    if path.is_dir():
        return {f.relative_to(path).as_posix(): sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for part in PARTS:
        model = getattr(pipe, part, None)
        if model is not None:
            out.update({f"{part}.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


def max_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert sorted(got) == sorted(want)
    return max(float((got[k].double() - want[k].double()).abs().max()) for k in want if want[k].numel())


def peft_lora(base: str, folder: Path, seed: int) -> Path:
    """A diffusers LoRA as trainers save it: peft layers with random B on UNet attention, projections, a 3x3
    conv and the feed-forward, and on a subset of each text encoder's q/k/v (OpenCLIP in_proj slices)."""
    pipe = tiny_models.tiny_pipeline(base, 1)
    torch.manual_seed(seed)
    configs = {
        "unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.2"]),
        "text_encoder": LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                                   target_modules=["q_proj", "v_proj", "fc1"]),
        "text_encoder_2": LoraConfig(r=3, lora_alpha=5, init_lora_weights=False,
                                     target_modules=["k_proj", "out_proj"]),
    }
    models = {name: getattr(pipe, name) for name in configs if getattr(pipe, name, None) is not None}
    for name, model in models.items():
        model.add_adapter(configs[name])
    PIPELINE[base].save_lora_weights(
        folder, **{f"{name}_lora_layers": get_peft_model_state_dict(m) for name, m in models.items()},
        **{f"{name}_lora_adapter_metadata": configs[name].to_dict() for name in models})
    return folder / "pytorch_lora_weights.safetensors"


class Model:
    """A tiny pipeline saved as a folder and as our single file, two LoRAs for it, and diffusers' fused result."""

    def __init__(self, base: str, root: Path) -> None:
        self.base = base
        self.folder = tiny_models.save_tiny_pipeline(base, root / "pipeline", seed=1)
        self.single = root / "model.safetensors"
        convert_checkpoint(self.folder, self.single, "ldm")
        self.loras = [peft_lora(base, (root / f"lora{i}"), seed=10 + i) for i in range(2)]
        pipe = PIPELINE[base].from_pretrained(self.folder, local_files_only=True)
        self.original = weights(pipe)
        for i, (lora, weight) in enumerate(zip(self.loras, WEIGHTS)):  # one after the other, as users fuse them
            pipe.load_lora_weights(str(lora), adapter_name=f"lora{i}")
            pipe.fuse_lora(lora_scale=weight, adapter_names=[f"lora{i}"])
            pipe.unload_lora_weights()
        self.fused = weights(pipe)

    def specs(self) -> list[LoraSpec]:
        return [LoraSpec(path, weight) for path, weight in zip(self.loras, WEIGHTS)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Model]:
    class Lazy(dict):
        def __missing__(self, base: str) -> Model:
            self[base] = Model(base, tmp_path_factory.mktemp(base))
            return self[base]

    return Lazy()


def changed_parts(model: Model) -> set[str]:
    return {k.split(".")[0] for k in model.fused if not torch.equal(model.fused[k], model.original[k])}


@pytest.mark.parametrize("base", ["sd1", "sdxl"])
def test_folder_merge_equals_diffusers_fuse_lora(models, base, tmp_path):
    model = models[base]
    out = tmp_path / "merged"
    report = merge_checkpoint(model.folder, model.specs(), out, sha256=sha256)
    assert changed_parts(model) == {"unet", "text_encoder"} | ({"text_encoder_2"} if base == "sdxl" else set())
    merged = weights(PIPELINE[base].from_pretrained(out, local_files_only=True))
    assert max_difference(merged, model.fused) <= TOLERANCE
    assert report["layout"] == "diffusers" and report["base"] == base
    assert [lora["modules"] for lora in report["loras"]] == [len(load_file(p)) // 2 for p in model.loras]
    ours = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert ours == sorted(p.relative_to(model.folder).as_posix() for p in model.folder.rglob("*"))
    vae = "vae/diffusion_pytorch_model.safetensors"  # no LoRA touches it: copied byte for byte
    assert sha256(out / vae) == sha256(model.folder / vae)


@pytest.mark.parametrize("base", ["sd1", "sd2", "sdxl"])
def test_single_file_merge_reads_back_like_diffusers_fuse_lora(models, base, tmp_path):
    """SD2's and SDXL's OpenCLIP encoders take q/k/v LoRAs (a subset of them) into their fused in_proj rows."""
    model = models[base]
    out = tmp_path / "merged.safetensors"
    report = merge_checkpoint(model.single, model.specs(), out, sha256=sha256)
    pipe = PIPELINE[base].from_single_file(str(out), config=str(model.folder), local_files_only=True)
    assert max_difference(weights(pipe), model.fused) <= TOLERANCE
    assert report["layout"] == "single-file"
    with safe_open(str(out), "pt") as merged, safe_open(str(model.single), "pt") as original:
        keys = original.keys()
        assert sorted(merged.keys()) == sorted(keys)
        untouched = [k for k in keys if k.startswith("first_stage_model.")]
        assert all(torch.equal(merged.get_tensor(k), original.get_tensor(k)) for k in untouched)


def test_a_merge_read_and_written_past_the_page_cache_writes_the_same_bytes(models, tmp_path, monkeypatch):
    """Large checkpoints stream with O_DIRECT (`direct_io`); forced here on a tiny one in 64 KiB chunks."""
    model = models["sd1"]
    merge_checkpoint(model.single, model.specs(), tmp_path / "cached.safetensors", sha256=sha256)
    monkeypatch.setattr(direct_io, "DIRECT_FROM_BYTES", 0)
    monkeypatch.setattr(direct_io, "CHUNK_BYTES", 64 << 10)
    merge_checkpoint(model.single, model.specs(), tmp_path / "direct.safetensors", sha256=sha256)
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "cached.safetensors").read_bytes()


def test_provenance_names_every_input_with_its_sha256_and_weight(models, tmp_path):
    model = models["sd1"]
    out = tmp_path / "merged.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # the merge gives the hashing thread a core while it runs, and must give it back
        merge_checkpoint(model.single, model.specs(), out, sha256=sha256)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    with safe_open(str(out), "pt") as fh:
        metadata = fh.metadata()
    record = json.loads(metadata["adapterzoo.operation"])
    assert record["op"] == "merge" and record["version"]
    assert record["inputs"] == [
        {"name": model.single.name, "sha256": sha256(model.single), "role": "checkpoint"},
        *({"name": p.name, "sha256": sha256(p), "weight": w, "role": "lora"} for p, w in zip(model.loras, WEIGHTS)),
    ]
    assert metadata["modelspec.merged_from"] == ", ".join([model.single.name, *(p.name for p in model.loras)])


def test_dtype_casts_every_floating_tensor_and_keeps_integers(models, tmp_path):
    model = models["sd1"]
    checkpoint = tmp_path / "with_position_ids.safetensors"  # real SD1 files carry this int64 buffer
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    save_file({**load_file(model.single), ids: torch.arange(77).unsqueeze(0)}, str(checkpoint))
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(checkpoint, model.specs(), out, sha256=sha256, dtype="fp16")
    merged = load_file(out)
    assert {t.dtype for k, t in merged.items() if k != ids} == {torch.float16}
    assert torch.equal(merged[ids], torch.arange(77).unsqueeze(0))
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(model.folder), local_files_only=True,
                                                    torch_dtype=torch.float32)
    got = weights(pipe)
    assert max(float((got[k] - model.fused[k]).abs().max()) for k in model.fused if k.startswith("unet.")) < 2e-3


# -- LyCORIS and DoRA against the formulas -------------------------------------------------------------

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
KOHYA_BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"
RESNET = "lora_unet_down_blocks_0_resnets_0"
TE_LAYER = "lora_te_text_model_encoder_layers_0"


def lycoris_files(folder: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A LyCORIS file with every module type on tiny SD1, and a plain LoRA on the DoRA module's weight."""
    g = torch.Generator().manual_seed(5)

    def r(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t = {
        f"{KOHYA_BLOCK}_attn1_to_q.hada_w1_a": r(32, 2), f"{KOHYA_BLOCK}_attn1_to_q.hada_w1_b": r(2, 32),
        f"{KOHYA_BLOCK}_attn1_to_q.hada_w2_a": r(32, 2), f"{KOHYA_BLOCK}_attn1_to_q.hada_w2_b": r(2, 32),
        f"{KOHYA_BLOCK}_attn1_to_q.alpha": torch.tensor(1.0),
        f"{KOHYA_BLOCK}_attn1_to_k.weight": r(32), f"{KOHYA_BLOCK}_attn1_to_k.on_input": torch.tensor(False),
        f"{KOHYA_BLOCK}_ff_net_2.weight": r(128), f"{KOHYA_BLOCK}_ff_net_2.on_input": torch.tensor(True),
        f"{KOHYA_BLOCK}_attn1_to_out_0.diff": r(32, 32), f"{KOHYA_BLOCK}_attn1_to_out_0.diff_b": r(32),
        f"{KOHYA_BLOCK}_attn2_to_out_0.lora_down.weight": r(4, 32),
        f"{KOHYA_BLOCK}_attn2_to_out_0.lora_up.weight": r(32, 4),
        f"{KOHYA_BLOCK}_attn2_to_out_0.alpha": torch.tensor(2.0),
        f"{KOHYA_BLOCK}_attn2_to_out_0.dora_scale": 1 + r(32, 1),
        f"{KOHYA_BLOCK}_attn2_to_k.lora_down.weight": r(4, 768), f"{KOHYA_BLOCK}_attn2_to_k.lora_up.weight": r(32, 4),
        f"{KOHYA_BLOCK}_attn2_to_k.alpha": torch.tensor(4.0),
        f"{KOHYA_BLOCK}_attn2_to_k.dora_scale": 1 + r(1, 768),
        f"{RESNET}_conv1.lora_down.weight": r(3, 32, 1, 1), f"{RESNET}_conv1.lora_mid.weight": r(3, 3, 3, 3),
        f"{RESNET}_conv1.lora_up.weight": r(32, 3, 1, 1), f"{RESNET}_conv1.alpha": torch.tensor(6.0),
        f"{RESNET}_conv2.lora_down.weight": r(3, 32, 3, 3), f"{RESNET}_conv2.lora_up.weight": r(32, 3, 1, 1),
        f"{RESNET}_conv2.alpha": torch.tensor(1.5),
        f"{TE_LAYER}_self_attn_q_proj.lokr_w1": r(4, 8), f"{TE_LAYER}_self_attn_q_proj.lokr_w2_a": r(192, 2),
        f"{TE_LAYER}_self_attn_q_proj.lokr_w2_b": r(2, 96), f"{TE_LAYER}_self_attn_q_proj.alpha": torch.tensor(3.0),
        f"{TE_LAYER}_layer_norm1.w_norm": r(768), f"{TE_LAYER}_layer_norm1.b_norm": r(768),
    }
    plain = {f"{KOHYA_BLOCK}_attn2_to_out_0.lora_down.weight": r(2, 32),
             f"{KOHYA_BLOCK}_attn2_to_out_0.lora_up.weight": r(32, 2),
             f"{KOHYA_BLOCK}_attn2_to_out_0.alpha": torch.tensor(1.0)}
    save_file(t, str(folder / "lycoris.safetensors"), {"ss_network_module": "lycoris.kohya"})
    save_file(plain, str(folder / "plain.safetensors"))
    return folder / "plain.safetensors", folder / "lycoris.safetensors", t | {f"plain.{k}": v for k, v in plain.items()}


def expected_lycoris(w: dict[str, torch.Tensor], t: dict[str, torch.Tensor], m: float, m_plain: float
                     ) -> dict[str, torch.Tensor]:
    """FORMATS.md §1.1 and §1.4 in plain torch; `w` holds the original weights by diffusers key."""
    unet, te = "unet.", "text_encoder."
    b, rn, tl = f"{unet}{BLOCK}", f"{unet}down_blocks.0.resnets.0", f"{te}encoder.layers.0"
    kb, out = KOHYA_BLOCK, {}
    loha = (t[f"{kb}_attn1_to_q.hada_w1_a"] @ t[f"{kb}_attn1_to_q.hada_w1_b"]) * (
        t[f"{kb}_attn1_to_q.hada_w2_a"] @ t[f"{kb}_attn1_to_q.hada_w2_b"]) * (1.0 / 2)
    out[f"{b}.attn1.to_q.weight"] = w[f"{b}.attn1.to_q.weight"] + m * loha
    out[f"{b}.attn1.to_k.weight"] = w[f"{b}.attn1.to_k.weight"] * (1 + m * t[f"{kb}_attn1_to_k.weight"])[:, None]
    out[f"{b}.ff.net.2.weight"] = w[f"{b}.ff.net.2.weight"] * (1 + m * t[f"{kb}_ff_net_2.weight"])[None, :]
    out[f"{b}.attn1.to_out.0.weight"] = w[f"{b}.attn1.to_out.0.weight"] + m * t[f"{kb}_attn1_to_out_0.diff"]
    out[f"{b}.attn1.to_out.0.bias"] = w[f"{b}.attn1.to_out.0.bias"] + m * t[f"{kb}_attn1_to_out_0.diff_b"]

    o = f"{kb}_attn2_to_out_0"
    plain = (1.0 / 2) * t[f"plain.{o}.lora_up.weight"] @ t[f"plain.{o}.lora_down.weight"]
    first = w[f"{b}.attn2.to_out.0.weight"] + m_plain * plain
    dora = first + (2.0 / 4) * t[f"{o}.lora_up.weight"] @ t[f"{o}.lora_down.weight"]
    normed = t[f"{o}.dora_scale"] * dora / dora.norm(dim=1, keepdim=True)  # [out, 1]: per output row
    out[f"{b}.attn2.to_out.0.weight"] = first + m * (normed - first)
    k = f"{kb}_attn2_to_k"
    base_k = w[f"{b}.attn2.to_k.weight"]
    dora = base_k + (4.0 / 4) * t[f"{k}.lora_up.weight"] @ t[f"{k}.lora_down.weight"]
    normed = t[f"{k}.dora_scale"] * dora / dora.norm(dim=0, keepdim=True)  # [1, in]: per input column
    out[f"{b}.attn2.to_k.weight"] = base_k + m * (normed - base_k)

    c1 = f"{RESNET}_conv1"
    tucker = torch.einsum("i j k l, j r, p i -> p r k l", t[f"{c1}.lora_mid.weight"],
                          t[f"{c1}.lora_down.weight"][:, :, 0, 0], t[f"{c1}.lora_up.weight"][:, :, 0, 0])
    out[f"{rn}.conv1.weight"] = w[f"{rn}.conv1.weight"] + m * tucker * (6.0 / 3)
    c2 = f"{RESNET}_conv2"
    locon = (t[f"{c2}.lora_up.weight"].flatten(1) @ t[f"{c2}.lora_down.weight"].flatten(1)).reshape(32, 32, 3, 3)
    out[f"{rn}.conv2.weight"] = w[f"{rn}.conv2.weight"] + m * locon * (1.5 / 3)

    q = f"{TE_LAYER}_self_attn_q_proj"
    lokr = torch.kron(t[f"{q}.lokr_w1"], t[f"{q}.lokr_w2_a"] @ t[f"{q}.lokr_w2_b"]) * (3.0 / 2)
    out[f"{tl}.self_attn.q_proj.weight"] = w[f"{tl}.self_attn.q_proj.weight"] + m * lokr
    out[f"{tl}.layer_norm1.weight"] = w[f"{tl}.layer_norm1.weight"] + m * t[f"{TE_LAYER}_layer_norm1.w_norm"]
    out[f"{tl}.layer_norm1.bias"] = w[f"{tl}.layer_norm1.bias"] + m * t[f"{TE_LAYER}_layer_norm1.b_norm"]
    return out


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**{f"unet.{k}": v for k, v in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items()},
            **{f"text_encoder.{k}": v for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()}}


def test_lycoris_and_dora_follow_the_formulas_applied_in_lora_order(models, tmp_path):
    """Every LyCORIS module type, both DoRA axes, and a plain LoRA merged before a DoRA on the same weight:
    the DoRA normalises the weight as the plain LoRA left it."""
    model = models["sd1"]
    plain, lycoris, tensors = lycoris_files(tmp_path)
    out = tmp_path / "merged"
    report = merge_checkpoint(model.folder, [LoraSpec(plain, 0.5), LoraSpec(lycoris, 0.6)], out, sha256=sha256)
    assert [lora["format"] for lora in report["loras"]] == ["kohya", "lycoris"]
    before, after = folder_weights(model.folder), folder_weights(out)
    expected = expected_lycoris(before, tensors, 0.6, 0.5)
    for key, want in expected.items():
        assert not torch.allclose(want, before[key]), f"{key}: the module should change it"
        torch.testing.assert_close(after[key], want, rtol=0, atol=TOLERANCE, msg=key)
    assert all(torch.equal(after[k], before[k]) for k in before if k not in expected)


def early_lokr_file(path: Path) -> dict[str, torch.Tensor]:
    """LoKr as early LyCORIS wrote convs: the 3x3 kernel split between both 2-D factors (on the tiny 32x32x3x3
    convs: w1 4x12, w2 8x24, kron 32x288), one w2 decomposed (alpha 3, rank 2), one both full (scale 1).
    Returns ΔW by diffusers weight key, as A1111 and ComfyUI form it: kron of the 2-D factors, reshaped."""
    g = torch.Generator().manual_seed(9)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    c1, c2 = f"{RESNET}_conv1", f"{RESNET}_conv2"
    t = {f"{c1}.lokr_w1": r(4, 12), f"{c1}.lokr_w2_a": r(8, 2), f"{c1}.lokr_w2_b": r(2, 24),
         f"{c1}.alpha": torch.tensor(3.0), f"{c2}.lokr_w1": r(4, 12), f"{c2}.lokr_w2": r(8, 24),
         f"{c2}.alpha": torch.tensor(1.0)}
    save_file(t, str(path), {"ss_network_module": "lycoris.kohya"})
    rn = "unet.down_blocks.0.resnets.0"
    return {f"{rn}.conv1.weight": torch.kron(t[f"{c1}.lokr_w1"], t[f"{c1}.lokr_w2_a"] @ t[f"{c1}.lokr_w2_b"]
                                             ).reshape(32, 32, 3, 3) * (3.0 / 2),
            f"{rn}.conv2.weight": torch.kron(t[f"{c2}.lokr_w1"], t[f"{c2}.lokr_w2"]).reshape(32, 32, 3, 3)}


def test_lokr_with_the_kernel_in_both_factors_merges_and_converts(models, tmp_path, capsys, monkeypatch):
    model = models["sd1"]
    lokr = tmp_path / "early_lokr.safetensors"
    deltas = early_lokr_file(lokr)
    code, printed, err = run(["merge", str(model.folder), "--lora", f"{lokr}:0.6", "-o", str(tmp_path / "m"),
                              "--json"], capsys, monkeypatch)
    assert code == 0, err
    before, after = folder_weights(model.folder), folder_weights(tmp_path / "m")
    for key, delta in deltas.items():
        torch.testing.assert_close(after[key], before[key] + 0.6 * delta, rtol=0, atol=TOLERANCE, msg=key)

    out = tmp_path / "rank4.safetensors"
    code, printed, err = run(["convert", str(lokr), "-o", str(out), "--to", "kohya", "--rank", "4",
                              "--checkpoint", str(model.folder), "--json"], capsys, monkeypatch)
    assert code == 0, err
    written = load_file(out)
    for key, delta in deltas.items():  # the best rank-4 approximation (Eckart-Young) of the reference ΔW
        kohya = f"{RESNET}_{key.split('.')[-2]}"
        up, down = written[f"{kohya}.lora_up.weight"].flatten(1), written[f"{kohya}.lora_down.weight"].flatten(1)
        scale = written[f"{kohya}.alpha"].item() / down.shape[0]
        u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        assert float(((up @ down).double() * scale - best).norm() / best.norm()) <= 1e-5, key
        assert s[4] > 1e-3 * s[0]  # rank 4 really truncates


def test_a_subset_of_q_k_v_changes_only_its_rows_of_the_fused_in_proj(models, tmp_path):
    model = models["sd2"]
    lora = tmp_path / "k_only.safetensors"
    g = torch.Generator().manual_seed(3)
    name = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    down, up = torch.randn(2, 1024, generator=g), torch.randn(1024, 2, generator=g)
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)},
              str(lora))
    out = tmp_path / "merged.safetensors"
    merge_checkpoint(model.single, [LoraSpec(lora, 2.0)], out, sha256=sha256)
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    before, after = load_file(model.single)[key], load_file(out)[key]
    assert torch.equal(after[:1024], before[:1024]) and torch.equal(after[2048:], before[2048:])
    torch.testing.assert_close(after[1024:2048], before[1024:2048] + 2.0 * 0.5 * up @ down, rtol=0, atol=TOLERANCE)


# -- refusals and interruptions ----------------------------------------------------------------------


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_lora_for_another_base_is_refused_before_writing(models, tmp_path):
    sd1, sdxl = models["sd1"], models["sdxl"]
    out = tmp_path / "merged.safetensors"
    with pytest.raises(AdapterzooError, match=r"sdxl .* sd1 checkpoint"):
        merge_checkpoint(sd1.single, [LoraSpec(sdxl.loras[0])], out, sha256=sha256)
    assert not out.exists() and not leftovers(tmp_path)


def lora_with_stray_keys(model: Model, folder: Path) -> tuple[Path, list[str]]:
    tensors = load_file(model.loras[0])
    stray = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_nowhere.lora_A.weight",
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_nowhere.lora_B.weight"]
    tensors[stray[0]], tensors[stray[1]] = torch.zeros(4, 32), torch.zeros(32, 4)
    path = folder / "stray.safetensors"
    save_file(tensors, str(path), safe_open(str(model.loras[0]), "pt").metadata())
    return path, stray


def test_keys_that_land_nowhere_are_named_and_allow_unmatched_merges_the_rest(models, tmp_path):
    model = models["sd1"]
    stray_lora, stray = lora_with_stray_keys(model, tmp_path)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(UnmatchedLoraKeysError, match="to_nowhere") as caught:
        merge_checkpoint(model.single, [LoraSpec(stray_lora, 0.7)], out, sha256=sha256)
    assert caught.value.json_details()["unmatched"] == stray
    assert not out.exists() and not leftovers(tmp_path)

    report = merge_checkpoint(model.single, [LoraSpec(stray_lora, 0.7)], out, sha256=sha256, allow_unmatched=True)
    assert report["loras"][0]["unmatched"] == stray
    clean = tmp_path / "clean.safetensors"
    merge_checkpoint(model.single, [LoraSpec(model.loras[0], 0.7)], clean, sha256=sha256)
    a, b = load_file(out), load_file(clean)
    assert all(torch.equal(a[k], b[k]) for k in b)


STRAY_MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_nowhere"


def peft_folder_with_stray_keys(model: Model, folder: Path) -> tuple[Path, Path, list[str]]:
    """The first LoRA's UNet part as a PEFT folder (adapter_config.json + adapter_model.safetensors, as a
    PeftModel's save_pretrained writes it) with a pair for a module the UNet lacks; and that UNet part as
    the diffusers file it came from."""
    metadata = safe_open(str(model.loras[0]), "pt").metadata()
    flat = json.loads(metadata["lora_adapter_metadata"])
    unet = {k: v for k, v in load_file(model.loras[0]).items() if k.startswith("unet.")}
    own = {f"base_model.model.{k.removeprefix('unet.')}": v for k, v in unet.items()}
    own[f"base_model.model.{STRAY_MODULE}.lora_A.weight"] = torch.zeros(4, 32)
    own[f"base_model.model.{STRAY_MODULE}.lora_B.weight"] = torch.zeros(32, 4)
    folder.mkdir()
    config = {k.removeprefix("unet."): v for k, v in flat.items() if k.startswith("unet.")}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(own, str(folder / "adapter_model.safetensors"))
    clean = folder.parent / "unet_only.safetensors"
    save_file(unet, str(clean), metadata)
    return folder, clean, [f"base_model.model.{STRAY_MODULE}.lora_{ab}.weight" for ab in "AB"]


def pickle_with_stray_keys(model: Model, folder: Path) -> tuple[Path, Path, list[str]]:
    """The first LoRA's tensors pickled (.pt: no metadata, so scale 1) with a stray pair; the same without it."""
    tensors = load_file(model.loras[0])
    stray = [f"unet.{STRAY_MODULE}.lora_A.weight", f"unet.{STRAY_MODULE}.lora_B.weight"]
    folder.mkdir()
    torch.save(tensors, folder / "clean.pt")
    torch.save({**tensors, stray[0]: torch.zeros(4, 32), stray[1]: torch.zeros(32, 4)}, folder / "stray.pt")
    return folder / "stray.pt", folder / "clean.pt", stray


@pytest.mark.parametrize("make", [peft_folder_with_stray_keys, pickle_with_stray_keys])
def test_allow_unmatched_leaves_out_only_the_stray_keys_of_a_peft_folder_or_a_pickle(models, tmp_path, make):
    model = models["sd1"]
    stray_lora, clean_lora, stray = make(model, tmp_path / "lora")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "lora").rglob("*"))
    out, clean = tmp_path / "merged.safetensors", tmp_path / "clean.safetensors"
    with pytest.raises(UnmatchedLoraKeysError) as caught:
        merge_checkpoint(model.single, [LoraSpec(stray_lora, 0.7)], out, sha256=sha256)
    assert caught.value.json_details()["unmatched"] == stray and not out.exists()

    report = merge_checkpoint(model.single, [LoraSpec(stray_lora, 0.7)], out, sha256=sha256, allow_unmatched=True)
    assert report["loras"][0]["unmatched"] == stray
    reference = merge_checkpoint(model.single, [LoraSpec(clean_lora, 0.7)], clean, sha256=sha256)
    assert report["loras"][0]["modules"] == reference["loras"][0]["modules"] > 10
    merged, original = load_file(out), load_file(model.single)
    assert max_difference(merged, load_file(clean)) <= TOLERANCE
    assert sum(not torch.equal(merged[k], original[k]) for k in original) > 10
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "lora").rglob("*")) == before


def test_allow_unmatched_merges_nothing_of_a_lora_of_which_nothing_lands_and_says_so(models, tmp_path, capsys,
                                                                                      monkeypatch):
    model = models["sd1"]
    nowhere = tmp_path / "nowhere.safetensors"
    stray = [f"unet.{STRAY_MODULE}.lora_A.weight", f"unet.{STRAY_MODULE}.lora_B.weight"]
    save_file({stray[0]: torch.zeros(4, 32), stray[1]: torch.zeros(32, 4)}, str(nowhere))
    out, alone = tmp_path / "merged.safetensors", tmp_path / "alone.safetensors"
    args = ["merge", str(model.single), "--lora", f"{model.loras[0]}:0.7", "--lora", str(nowhere), "-o", str(out)]
    code, _, err = run(args, capsys, monkeypatch)
    assert code == 1 and "to_nowhere" in err and err.count("\n") == 1 and not out.exists()
    code, printed, _ = run([*args, "--allow-unmatched", "--json"], capsys, monkeypatch)
    assert code == 0
    assert json.loads(printed)["loras"][1] == {"path": str(nowhere), "weight": 1.0, "format": None, "modules": 0,
                                               "components": {}, "unmatched": stray}
    merge_checkpoint(model.single, [LoraSpec(model.loras[0], 0.7)], alone, sha256=sha256)
    assert max_difference(load_file(out), load_file(alone)) <= TOLERANCE


def test_cli_merges_lists_unmatched_keys_and_refuses_in_one_line(models, tmp_path, capsys, monkeypatch):
    model = models["sd1"]
    stray_lora, stray = lora_with_stray_keys(model, tmp_path)
    out = tmp_path / "merged.safetensors"
    code, _, err = run(["merge", str(model.single), "--lora", f"{stray_lora}:0.7", "-o", str(out)], capsys, monkeypatch)
    assert code == 1 and err.startswith("error: ") and "to_nowhere" in err and err.count("\n") == 1
    code, printed, _ = run(["merge", str(model.single), "--lora", f"{stray_lora}:0.7", "-o", str(out),
                            "--allow-unmatched", "--device", "cpu"], capsys, monkeypatch)
    assert code == 0 and all(f"unmatched {stray_lora.name}: {key}" in printed for key in stray)
    code, printed, _ = run(["merge", str(model.single), "--lora", str(model.loras[0]), "--lora",
                            f"{model.loras[1]}:-0.4", "-o", str(tmp_path / "two.safetensors"), "--json"],
                           capsys, monkeypatch)
    report = json.loads(printed)
    assert code == 0 and [lora["weight"] for lora in report["loras"]] == [1.0, -0.4]
    code, _, err = run(["merge", str(model.single), "--lora", f"{model.loras[0]}:strong", "-o",
                        str(tmp_path / "x.safetensors")], capsys, monkeypatch)
    assert code == 2 and "--lora" in err


@pytest.mark.parametrize("layout", ["single", "folder"])
def test_an_interrupt_while_writing_leaves_no_output(models, tmp_path, monkeypatch, layout):
    model = models["sd1"]
    calls = []
    original = merging._apply

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(merging, "_apply", interrupted)
    src = model.single if layout == "single" else model.folder
    out = tmp_path / ("merged.safetensors" if layout == "single" else "merged")
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoint(src, model.specs(), out, sha256=sha256)
    assert len(calls) == 3 and not out.exists() and not leftovers(tmp_path)


def test_out_of_device_memory_merges_that_tensor_on_the_cpu(models, tmp_path, monkeypatch):
    """No GPU here: the device run is made to fail with OutOfMemoryError for one tensor, as cuda would."""
    model = models["sd1"]
    original = merging._apply
    failed = []

    def short_of_memory(weight, patches, device, scratch):
        if device.type != "cpu":
            failed.append(patches[0].location.key)
            raise torch.OutOfMemoryError("CUDA out of memory")
        return original(weight, patches, device, scratch)

    monkeypatch.setattr(merging, "_apply", short_of_memory)
    out = tmp_path / "merged.safetensors"
    report = merge_checkpoint(model.single, model.specs(), out, sha256=sha256, device=torch.device("cuda"))
    assert failed and len(report["warnings"]) == len(failed)
    assert all("out of cuda memory" in warning for warning in report["warnings"])
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=str(model.folder), local_files_only=True)
    assert max_difference(weights(pipe), model.fused) <= TOLERANCE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_equals_the_cpu_merge(models, tmp_path):
    model = models["sdxl"]
    on_gpu, on_cpu = tmp_path / "gpu.safetensors", tmp_path / "cpu.safetensors"
    report = merge_checkpoint(model.single, model.specs(), on_gpu, sha256=sha256, device=torch.device("cuda"))
    merge_checkpoint(model.single, model.specs(), on_cpu, sha256=sha256, device=torch.device("cpu"))
    assert report["device"] == "cuda" and not report["warnings"]
    assert max_difference(load_file(on_gpu), load_file(on_cpu)) <= TOLERANCE


# -- convert --checkpoint ----------------------------------------------------------------------------


def test_convert_resolves_a_tiny_model_lora_against_its_checkpoint(models, tmp_path):
    """The built-in SD1 table has no 32-wide attention, so only the checkpoint's own modules fit the LoRA."""
    model = models["sd1"]
    kohya = tmp_path / "kohya.safetensors"
    with pytest.raises(UnmatchedKeysError):
        convert(model.loras[0], kohya, "kohya")
    with pytest.raises(AdapterzooError, match="sdxl"):
        convert(models["sdxl"].loras[0], kohya, "kohya", checkpoint=model.folder)
    report = convert(model.loras[0], kohya, "kohya", checkpoint=model.single)
    assert report["kind"] == "lora" and report["to"] == "kohya"
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in load_file(kohya))
    via_kohya, direct = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge_checkpoint(model.single, [LoraSpec(kohya, 0.7)], via_kohya, sha256=sha256)
    merge_checkpoint(model.single, [LoraSpec(model.loras[0], 0.7)], direct, sha256=sha256)
    assert max_difference(load_file(via_kohya), load_file(direct)) <= TOLERANCE


@pytest.mark.parametrize("base", ["sd1", "sd2", "sdxl"])
def test_real_size_single_files_hold_every_target_of_the_builtin_tables(base, tmp_path):
    """Sparse files with every real key and shape: each built-in target has its weight, shaped to fit."""
    path = factory.write_sparse_safetensors(tmp_path / "model.safetensors", factory.sd_checkpoint_specs(base))
    targets = checkpoint_targets(path)
    builtin = builtin_architecture(base)
    assert targets.base == base
    for name, target in builtin.targets.items():
        assert targets.architecture.targets[name].shape == target.shape, name
        assert name in targets.locations, name
    fused = [loc for loc in targets.locations.values() if loc.rows is not None]
    assert len(fused) == {"sd1": 0, "sd2": 3 * 24, "sdxl": 3 * 32}[base]


# -- a PEFT folder per model part ----------------------------------------------------------------------


def per_component_peft_folder(lora: Path, folder: Path) -> Path:
    """A diffusers LoRA file as one PEFT adapter per model part (unet/, text_encoder/, text_encoder_2/), as
    PeftModel.save_pretrained writes each: `base_model.model.` keys, and that part's LoraConfig as JSON."""
    flat = json.loads(safe_open(str(lora), "pt").metadata()["lora_adapter_metadata"])
    tensors = load_file(lora)
    for component in sorted({k.split(".")[0] for k in tensors}):
        prefix = component + "."
        (folder / component).mkdir(parents=True)
        own = {f"base_model.model.{k.removeprefix(prefix)}": v for k, v in tensors.items() if k.startswith(prefix)}
        save_file(own, str(folder / component / "adapter_model.safetensors"))
        config = {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}
        (folder / component / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("base", ["sd1", "sdxl"])
def test_a_peft_folder_per_component_merges_like_the_same_lora_as_one_diffusers_file(models, base, tmp_path):
    """Each part keeps its own alpha (SD1 here: UNet 8/4, text encoder 2/4), so mixing the configs up shows."""
    model = models[base]
    folder = per_component_peft_folder(model.loras[0], tmp_path / "lora")
    parts = ["text_encoder", "unet"] + (["text_encoder_2"] if base == "sdxl" else [])
    assert sorted(p.name for p in folder.iterdir()) == sorted(parts) and not (folder / "adapter_config.json").exists()
    before = sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    out, reference = tmp_path / "merged.safetensors", tmp_path / "reference.safetensors"
    report = merge_checkpoint(model.single, [LoraSpec(folder, 0.7)], out, sha256=sha256)
    expected = merge_checkpoint(model.single, [LoraSpec(model.loras[0], 0.7)], reference, sha256=sha256)
    assert report["loras"][0]["format"] == "peft"
    assert report["loras"][0]["components"] == expected["loras"][0]["components"]
    assert report["loras"][0]["modules"] == expected["loras"][0]["modules"] == len(load_file(model.loras[0])) // 2
    merged, original = load_file(out), load_file(model.single)
    assert max_difference(merged, load_file(reference)) <= TOLERANCE
    assert sum(not torch.equal(merged[k], original[k]) for k in original) > 10
    assert sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before


# -- a UNet alone (ComfyUI's models/unet and models/diffusion_models) ---------------------------------------

UNET_LAYOUTS = ("diffusers-file", "diffusers-folder", "ldm-file", "ldm-unprefixed")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def unet_alone(model: Model, layout: str, folder: Path) -> Path:
    """The model's UNet as ComfyUI's models/unet holds one: diffusers keys in a file or in a folder with its
    config.json (no model_index.json), or the LDM keys of a single file, with or without model.diffusion_model."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers-folder":
        return Path(shutil.copytree(model.folder / "unet", folder / "my-unet"))
    if layout == "diffusers-file":
        return Path(shutil.copy(model.folder / "unet" / UNET_WEIGHTS, folder / "unet.safetensors"))
    tensors = {k: v for k, v in load_file(model.single).items() if k.startswith(unet_names.LDM_PREFIX)}
    if layout == "ldm-unprefixed":
        tensors = {k.removeprefix(unet_names.LDM_PREFIX): v for k, v in tensors.items()}
    save_file(tensors, str(folder / "unet.safetensors"))
    return folder / "unet.safetensors"


def unet_weights(model: Model, layout: str, path: Path) -> dict[str, torch.Tensor]:
    """The UNet at `path` as diffusers loads it (an unprefixed LDM file after giving its keys the prefix back:
    diffusers' single-file loader reads only prefixed ones)."""
    if layout == "diffusers-folder":
        unet = UNet2DConditionModel.from_pretrained(path, local_files_only=True)
    else:
        if layout == "ldm-unprefixed":
            prefixed = path.with_name("prefixed.safetensors")
            save_file({unet_names.LDM_PREFIX + k: v for k, v in load_file(path).items()}, str(prefixed))
            path = prefixed
        unet = UNet2DConditionModel.from_single_file(str(path), config=str(model.folder), subfolder="unet",
                                                     local_files_only=True)
    return {k: v.detach() for k, v in unet.state_dict().items()}


def fused_unet(model: Model) -> dict[str, torch.Tensor]:
    return {k.removeprefix("unet."): v for k, v in model.fused.items() if k.startswith("unet.")}


def unet_part(lora: Path, dest: Path) -> Path:
    """A LoRA's UNet part alone, with its metadata (alphas), as a UNet-only trainer writes it."""
    save_file({k: v for k, v in load_file(lora).items() if k.startswith("unet.")}, str(dest),
              safe_open(str(lora), "pt").metadata())
    return dest


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
@pytest.mark.parametrize("base", ["sd1", "sdxl"])
def test_a_unet_alone_merges_like_diffusers_fuse_lora_and_keeps_its_layout(models, base, layout, tmp_path):
    model = models[base]
    unet = unet_alone(model, layout, tmp_path / "models" / "unet")
    out = tmp_path / ("merged" if layout == "diffusers-folder" else "merged.safetensors")
    report = merge_checkpoint(unet, model.specs(), out, sha256=sha256, allow_unmatched=True)
    assert report["base"] == base
    assert max_difference(unet_weights(model, layout, out), fused_unet(model)) <= TOLERANCE
    assert max_difference(unet_weights(model, layout, unet), {k.removeprefix("unet."): v for k, v in
                                                              model.original.items() if k.startswith("unet.")}) == 0
    if layout == "diffusers-folder":
        assert sorted(p.name for p in out.iterdir()) == ["config.json", UNET_WEIGHTS]
        assert (out / "config.json").read_bytes() == (unet / "config.json").read_bytes()
    else:
        assert out.is_file() and sorted(load_file(out)) == sorted(load_file(unet))
    text_encoders = [c for c in ("text_encoder", "text_encoder_2") if c in changed_parts(model)]
    for lora, path in zip(report["loras"], model.loras):
        assert lora["components"] == {"unet": len([k for k in load_file(path) if k.startswith("unet.")]) // 2}
        assert lora["unmatched"] == sorted(k for k in load_file(path) if k.startswith(tuple(text_encoders)))
    assert [w for w in report["warnings"] if "text-encoder part" in w] == [
        f"{p.name}: its text-encoder part ({len(lora['unmatched'])} key(s)) is left out, {unet.name} is a UNet alone"
        for p, lora in zip(model.loras, report["loras"])]


def test_a_text_encoder_part_is_refused_by_name_and_a_unet_only_lora_needs_no_flag(models, tmp_path, capsys,
                                                                                    monkeypatch):
    model = models["sd1"]
    unet = unet_alone(model, "diffusers-file", tmp_path / "models" / "unet")
    out = tmp_path / "merged.safetensors"
    capsys.readouterr()
    code, _, err = run(["merge", str(unet), "--lora", f"{model.loras[0]}:0.7", "-o", str(out)], capsys, monkeypatch)
    assert code == 1 and not out.exists() and not leftovers(tmp_path)
    assert err == (
        "error: pytorch_lora_weights.safetensors: its text-encoder part (3 module(s): "
        "text_encoder.encoder.layers.0.mlp.fc1, text_encoder.encoder.layers.0.self_attn.q_proj, "
        "text_encoder.encoder.layers.0.self_attn.v_proj) has nowhere to go in unet.safetensors, a UNet alone "
        "(--allow-unmatched merges the UNet part alone)\n")
    code, _, err = run(["merge", str(unet), "--lora", f"{model.loras[0]}:0.7", "-o", str(out), "--allow-unmatched"],
                       capsys, monkeypatch)
    assert code == 0
    alone = tmp_path / "alone.safetensors"
    code, _, err = run(["merge", str(unet), "--lora", f"{unet_part(model.loras[0], tmp_path / 'u.safetensors')}:0.7",
                        "-o", str(alone)], capsys, monkeypatch)
    assert code == 0 and "text-encoder" not in err
    merged = load_file(alone)
    assert max_difference(merged, load_file(out)) == 0
    assert sum(not torch.equal(merged[k], v) for k, v in load_file(unet).items()) > 10


@pytest.mark.parametrize("layout", ["diffusers-file", "diffusers-folder"])
def test_a_lora_for_another_base_is_refused_for_a_unet_alone_too(models, layout, tmp_path, capsys, monkeypatch):
    unet = unet_alone(models["sd1"], layout, tmp_path / "models" / "unet")
    out = tmp_path / ("merged" if layout == "diffusers-folder" else "merged.safetensors")
    sdxl_unet_lora = unet_part(models["sdxl"].loras[0], tmp_path / "sdxl.safetensors")
    capsys.readouterr()
    code, _, err = run(["merge", str(unet), "--lora", str(sdxl_unet_lora), "-o", str(out)], capsys, monkeypatch)
    assert code == 1 and not out.exists()
    assert err == (f"error: sdxl.safetensors is a sdxl lora but {unet.name} is a sd1 checkpoint; "
                   "a LoRA only fits the base it was trained on\n")


def test_merging_into_a_unet_folder_never_replaces_another_kind_of_folder(models, tmp_path):
    unet = unet_alone(models["sd1"], "diffusers-folder", tmp_path / "models" / "unet")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_bytes(b"png")
    with pytest.raises(AdapterzooError, match=r"photos exists and is not a UNet folder \(config.json\)"):
        merge_checkpoint(unet, models["sd1"].specs(), other, sha256=sha256, allow_unmatched=True, force=True)
    assert sorted(p.name for p in other.iterdir()) == ["cat.png"]


def test_probe_and_scan_describe_a_comfyui_unet_library(models, tmp_path, capsys, monkeypatch):
    model = models["sdxl"]
    root = tmp_path / "ComfyUI" / "models"
    paths = {layout: unet_alone(model, layout, root / folder / layout) for layout, folder in
             zip(UNET_LAYOUTS, ("unet", "unet", "diffusion_models", "diffusion_models"))}
    found = probe(paths["diffusers-folder"])
    assert (found.kind, found.base, found.format, found.details["components"]) == ("checkpoint", "sdxl", "diffusers",
                                                                                   ["unet"])
    code, printed, _ = run(["scan", str(root), "--json"], capsys, monkeypatch)
    rows = {Path(r["path"]).relative_to(root).parts[1]: r for r in json.loads(printed)["files"]}
    assert code == 0 and sorted(rows) == sorted(UNET_LAYOUTS)
    assert {layout: (r["kind"], r["base"], r["format"]) for layout, r in rows.items()} == {
        "diffusers-file": ("checkpoint", "sdxl", "diffusers"), "diffusers-folder": ("checkpoint", "sdxl", "diffusers"),
        "ldm-file": ("checkpoint", "sdxl", "ldm"), "ldm-unprefixed": ("checkpoint", "sdxl", "ldm")}


def test_extract_between_unets_alone_gives_back_the_merged_lora(models, tmp_path):
    """What `merge` put into a diffusers UNet file, `extract` takes out of it against the LDM one: rank 4 holds it."""
    model = models["sd1"]
    lora = unet_part(model.loras[0], tmp_path / "u.safetensors")
    diffusers_unet = unet_alone(model, "diffusers-file", tmp_path / "a")
    ldm_unet = unet_alone(model, "ldm-unprefixed", tmp_path / "b")
    merged = tmp_path / "merged.safetensors"
    merge_checkpoint(diffusers_unet, [LoraSpec(lora, 0.7)], merged, sha256=sha256)
    extracted = tmp_path / "extracted.safetensors"
    report = extract_lora(ldm_unet, merged, extracted, 4, torch.device("cpu"), sha256)
    assert report["retained_fro"] >= 1 - 1e-5
    again = tmp_path / "again.safetensors"
    merge_checkpoint(diffusers_unet, [LoraSpec(extracted)], again, sha256=sha256)
    assert max_difference(load_file(again), load_file(merged)) <= TOLERANCE


CONVERT_REFUSALS = {
    "diffusers-file": ["unet.safetensors is not a single-file checkpoint (no model.diffusion_model.* weights)"] * 2,
    "diffusers-folder": ["{unet} is not a diffusers pipeline folder (no model_index.json)"] * 2,
    "ldm-file": [None, "no VAE (first_stage_model.*) in the checkpoint; a diffusers pipeline needs one"],
    "ldm-unprefixed": ["unet.safetensors is not a single-file checkpoint (no model.diffusion_model.* weights)"] * 2,
}


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
def test_convert_of_a_unet_alone_rewrites_an_ldm_file_or_refuses_in_one_line(models, layout, tmp_path, capsys,
                                                                             monkeypatch):
    """Checkpoint conversion reads whole models; a UNet alone gets a one-line reason, never a traceback."""
    unet = unet_alone(models["sd1"], layout, tmp_path / "models" / "unet")
    capsys.readouterr()  # what building the model printed
    for to, out, refusal in zip(("ldm", "diffusers"), (tmp_path / "out.safetensors", tmp_path / "out"),
                                CONVERT_REFUSALS[layout]):
        code, _, err = run(["convert", str(unet), "--to", to, "-o", str(out)], capsys, monkeypatch)
        if refusal is None:
            assert code == 0 and load_file(out).keys() == load_file(unet).keys()
        else:
            assert (code, err) == (1, f"error: {refusal.format(unet=unet)}\n") and not out.exists()
