"""`adapterzoo merge-loras` through the real entry point: the merged ΔW is Σ wᵢ·ΔWᵢ (concat, exactly) or its
optimal truncation (svd), whatever dialect each input spells its modules in.

References are plain torch on explicit matrices built from the raw tensors (FORMATS.md §1.1).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import factory
import pytest
import torch
from cli_helpers import run
from deltas import kohya_deltas
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.probe import probe
from adapterzoo.tiny_models import save_tiny_pipeline

LINEAR = r"down_blocks\.1\.attentions\.0\.(proj_in|transformer_blocks\.0\.(attn1\.to_q|attn2\.to_k))$"
CONV = r"down_blocks\.1\.resnets\.0\.conv1$"
ONLY_B = r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.ff\.net\.2$"
TE = ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_mlp_fc1")
W_A, W_B = 0.7, -0.4


def write_pair(sd: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], rank: int, alpha: float,
               gen: torch.Generator, mid: bool = False) -> None:
    kernel = (1, 1) if mid else tuple(shape[2:])
    sd[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], *kernel, generator=gen) * 0.1
    sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, *[1] * len(shape[2:]), generator=gen) * 0.1
    if mid:
        sd[f"{name}.lora_mid.weight"] = torch.randn(rank, rank, *shape[2:], generator=gen)
    sd[f"{name}.alpha"] = torch.tensor(alpha)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """A: kohya (diffusers UNet names), rank 4, alpha 2, TE + UNet linears + a 3x3 conv.
    B: LyCORIS spelling with LDM UNet names, rank 3, alpha 6, a Tucker 3x3 conv and a module A lacks.
    Returns both paths and B's module names by the diffusers-named kohya name the output will use."""
    gen = torch.Generator().manual_seed(0)
    te = {k: v for k, v in factory.te_targets("clip_l", "lora_te").items() if k in TE}
    unet = {**factory.unet_targets("sd1", ldm=False, pattern=LINEAR), **factory.unet_targets("sd1", False, CONV)}
    a, b = {}, {}
    for name, shape in {**te, **unet}.items():
        write_pair(a, name, shape, 4, 2.0, gen)
    ldm = {**factory.unet_targets("sd1", ldm=True, pattern=LINEAR), **factory.unet_targets("sd1", True, CONV),
           **factory.unet_targets("sd1", ldm=True, pattern=ONLY_B)}
    diffusers_names = [*unet, *factory.unet_targets("sd1", ldm=False, pattern=ONLY_B)]
    for name, shape in ldm.items():
        write_pair(b, name, shape, 3, 6.0, gen, mid=len(shape) == 4 and shape[2] == 3)
    folder = tmp_path_factory.mktemp("merge-loras")
    path_a, path_b = folder / "style:a.safetensors", folder / "b.safetensors"
    save_file(a, str(path_a), metadata={"ss_network_dim": "4", "ss_tag_frequency": "{}"})
    save_file(b, str(path_b))
    return path_a, path_b, dict(zip(diffusers_names, ldm))


def expected_sum(inputs: tuple[Path, Path, dict[str, str]], w_a: float, w_b: float) -> dict[str, torch.Tensor]:
    path_a, path_b, b_names = inputs
    total = {name: w_a * delta for name, delta in kohya_deltas(load_file(path_a)).items()}
    deltas_b = kohya_deltas(load_file(path_b))
    for name, ldm_name in b_names.items():
        total[name] = total.get(name, 0) + w_b * deltas_b[ldm_name]
    return total


def test_concat_is_exact_adds_ranks_and_records_how_it_was_made(inputs, tmp_path, capsys, monkeypatch):
    path_a, path_b, b_names = inputs
    out = tmp_path / "merged.safetensors"
    code, stdout, stderr = run(["merge-loras", f"{path_a}:{W_A}", f"{path_b}:{W_B}", "-o", str(out), "--json"],
                               capsys, monkeypatch)
    assert (code, stderr) == (0, "")
    report = json.loads(stdout)
    written = load_file(out)
    merged = kohya_deltas(written)
    expected = expected_sum(inputs, W_A, W_B)
    assert set(merged) == set(expected) and len(merged) == 2 + 4 + 1
    for name, delta in expected.items():
        assert float(torch.linalg.norm(merged[name] - delta)) <= 1e-6 * float(delta.norm()), name
        in_a, in_b = name in kohya_deltas(load_file(path_a)), name in b_names
        assert written[f"{name}.lora_down.weight"].shape[0] == 4 * in_a + 3 * in_b, name
    assert [i["weight"] for i in report["inputs"]] == [W_A, W_B] and report["method"] == "concat"
    assert [i["format"] for i in report["inputs"]] == ["kohya", "lycoris"]

    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert "ss_tag_frequency" not in metadata  # one input's training notes do not describe the merge
    assert metadata["modelspec.merged_from"] == f"{path_a.name}, {path_b.name}"
    operation = json.loads(metadata["adapterzoo.operation"])
    assert operation["op"] == "merge-loras" and operation["method"] == "concat" and "rule" not in operation
    assert operation["inputs"] == [
        {"name": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "weight": w}
        for p, w in ((path_a, W_A), (path_b, W_B))]

    result = probe(out)
    assert (result.kind, result.base, result.format) == ("lora", "sd1", "kohya")
    assert len(load_lora(out).modules) == len(expected)


def test_svd_gives_the_optimal_truncation_of_the_sum_with_its_retained_fraction(inputs, tmp_path, capsys,
                                                                                 monkeypatch):
    path_a, path_b, _ = inputs
    out = tmp_path / "merged-svd.safetensors"
    code, stdout, stderr = run(["merge-loras", str(path_a), f"{path_b}:{W_B}", "-o", str(out), "--method", "svd",
                                "--rank", "3", "--json"], capsys, monkeypatch)
    assert (code, stderr) == (0, ""), stderr  # path_a has a ':' in its name and no weight: weight 1
    report = json.loads(stdout)
    rows = {row["module"]: row for row in report["modules"]}
    architecture = load_lora(out).architecture
    by_kohya = {architecture.kohya_name(architecture.targets[path]): path for path in rows}
    merged = kohya_deltas(load_file(out))
    kept = total = 0.0
    for name, delta in expected_sum(inputs, 1.0, W_B).items():
        s = torch.linalg.svdvals(delta)
        error = float(torch.linalg.norm(delta - merged[name]))
        assert error == pytest.approx(float(s[3:].norm()), rel=1e-4, abs=1e-5 * float(s[0])), name
        row = rows[by_kohya[name]]
        assert row["rank"] == 3 and row["retained_fro"] == pytest.approx(float(s[:3].norm() / s.norm()), rel=1e-5)
        kept, total = kept + float(s[:3].square().sum()), total + float(s.square().sum())
    assert report["retained_fro"] == pytest.approx((kept / total) ** 0.5, rel=1e-5)
    with safe_open(str(out), "pt") as f:
        operation = json.loads(f.metadata()["adapterzoo.operation"])
    assert operation["method"] == "svd" and operation["rule"] == {"rank": 3}
    assert [i["weight"] for i in operation["inputs"]] == [1.0, W_B]


def test_svd_with_a_dynamic_rule_keeps_per_module_ranks(inputs, tmp_path, capsys, monkeypatch):
    path_a, path_b, _ = inputs
    out = tmp_path / "merged-fro.safetensors"
    code, stdout, _ = run(["merge-loras", f"{path_a}:1", f"{path_b}:1", "-o", str(out), "--method", "svd",
                           "--sv-fro", "0.8"], capsys, monkeypatch)
    assert code == 0 and "RETAINED_FRO" in stdout and "retained" in stdout
    for name, delta in expected_sum(inputs, 1.0, 1.0).items():
        s = torch.linalg.svdvals(delta)
        k = next(k for k in range(1, len(s) + 1) if float(s[:k].norm() / s.norm()) >= 0.8)
        assert load_file(out)[f"{name}.lora_down.weight"].shape[0] == k, name


def test_loras_for_different_bases_are_refused_saying_which_file_is_for_what(inputs, tmp_path, capsys, monkeypatch):
    path_a = inputs[0]
    sd2 = {}
    write_pair(sd2, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (320, 1024), 2, 1.0,
               torch.Generator().manual_seed(1))
    path_sd2 = tmp_path / "for_sd2.safetensors"
    save_file(sd2, str(path_sd2))
    out = tmp_path / "x.safetensors"
    code, _, stderr = run(["merge-loras", str(path_a), str(path_sd2), "-o", str(out)], capsys, monkeypatch)
    assert code == 1 and not out.exists() and stderr.count("\n") == 1
    assert f"{path_a} is for sd1" in stderr and f"{path_sd2} is for sd2" in stderr


def test_concat_refuses_lycoris_modules_and_no_method_sums_ia3(inputs, tmp_path, capsys, monkeypatch):
    loha = factory.CASES["lycoris-loha"](tmp_path).path
    code, _, stderr = run(["merge-loras", str(inputs[0]), str(loha), "-o", str(tmp_path / "x.safetensors")],
                          capsys, monkeypatch)
    assert code == 1 and f"{loha} has 224 LoHa module(s)" in stderr and "--method svd" in stderr
    ia3 = factory.CASES["lycoris-ia3"](tmp_path).path
    code, _, stderr = run(["merge-loras", str(inputs[0]), str(ia3), "-o", str(tmp_path / "x.safetensors"),
                           "--method", "svd", "--rank", "2"], capsys, monkeypatch)
    assert code == 1 and "IA3 module(s)" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(("args", "says"), [
    (["--method", "svd"], "needs a rank rule"),
    (["--rank", "4"], "takes no rank rule"),
    (["--method", "svd", "--rank", "2", "--sv-fro", "0.9"], "one rank rule"),
])
def test_method_and_rule_usage_errors_exit_2(args, says, inputs, tmp_path, capsys, monkeypatch):
    code, _, stderr = run(["merge-loras", str(inputs[1]), "-o", str(tmp_path / "x.safetensors"), *args],
                          capsys, monkeypatch)
    assert code == 2 and says in stderr


@pytest.mark.parametrize("spec", ["missing.safetensors:0.5", "{b}:heavy", "{b}:nan"])
def test_a_bad_file_weight_spec_is_a_usage_error(spec, inputs, tmp_path, capsys, monkeypatch):
    code, _, stderr = run(["merge-loras", spec.format(b=inputs[1]), "-o", str(tmp_path / "x.safetensors")],
                          capsys, monkeypatch)
    assert code == 2 and ("no such file" in stderr or "finite" in stderr)


def test_inputs_are_never_overwritten(inputs, tmp_path, capsys, monkeypatch):
    mine = Path(shutil.copy(inputs[1], tmp_path / "mine.safetensors"))
    before = mine.read_bytes()
    code, _, stderr = run(["merge-loras", str(mine), "-o", str(mine), "--force"], capsys, monkeypatch)
    assert code == 1 and "one of the inputs" in stderr and mine.read_bytes() == before


# -- --checkpoint: LoRAs for a model the built-in tables don't know ---------------------------------------------

TINY_ATTN, LDM_ATTN = "down_blocks.0.attentions.0", "lora_unet_input_blocks_1_1"
# module of the tiny SD1 folder -> (its weight file, in A, how B spells it (LDM UNet names) or None: not in B)
TINY = {
    f"{TINY_ATTN}.transformer_blocks.0.attn1.to_q": ("unet", True, f"{LDM_ATTN}_transformer_blocks_0_attn1_to_q"),
    f"{TINY_ATTN}.transformer_blocks.0.attn2.to_k": ("unet", True, f"{LDM_ATTN}_transformer_blocks_0_attn2_to_k"),
    f"{TINY_ATTN}.transformer_blocks.0.ff.net.2": ("unet", False, f"{LDM_ATTN}_transformer_blocks_0_ff_net_2"),
    f"{TINY_ATTN}.proj_in": ("unet", True, None),  # a 1x1 conv
    "down_blocks.0.resnets.0.conv1": ("unet", True, "lora_unet_input_blocks_1_0_in_layers_2"),
    "encoder.layers.0.self_attn.q_proj": ("text_encoder", True, None),
    "encoder.layers.0.mlp.fc1": ("text_encoder", True, "lora_te_text_model_encoder_layers_0_mlp_fc1"),
}
TINY_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors"}


def tiny_kohya_name(module: str) -> str:
    """The name A and the output give a module: kohya's, with diffusers UNet paths."""
    prefix = "lora_unet_" if TINY[module][0] == "unet" else "lora_te_text_model_"
    return prefix + module.replace(".", "_")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny SD1 folder (32-wide UNet, 64-wide CLIP MLP: no built-in table fits) and two LoRAs for it.
    A: kohya, rank 3, alpha 1.5. B: LyCORIS spelling with LDM UNet names, rank 2, no alpha (scale 1), a Tucker
    3x3 conv and a module A lacks."""
    root = tmp_path_factory.mktemp("tiny")
    folder = save_tiny_pipeline("sd1", root / "tiny-sd1")
    gen = torch.Generator().manual_seed(7)
    a, b = {}, {}
    for module, (component, in_a, b_name) in TINY.items():
        with safe_open(str(folder / TINY_FILES[component]), "pt") as f:
            shape = tuple(f.get_slice(f"{module}.weight").get_shape())
        if in_a:
            write_pair(a, tiny_kohya_name(module), shape, 3, 1.5, gen)
        if b_name:
            write_pair(b, b_name, shape, 2, 1.0, gen, mid=len(shape) == 4)
    path_a, path_b = root / "tiny_a.safetensors", root / "tiny_b.safetensors"
    save_file(a, str(path_a))
    save_file({k: v for k, v in b.items() if not k.endswith(".alpha")}, str(path_b))
    return folder, path_a, path_b


def test_checkpoint_resolves_loras_of_a_model_the_builtin_tables_do_not_know(tiny, tmp_path, capsys, monkeypatch):
    folder, path_a, path_b = tiny
    out = tmp_path / "merged.safetensors"
    args = ["merge-loras", f"{path_a}:{W_A}", f"{path_b}:{W_B}", "-o", str(out)]
    code, _, stderr = run(args, capsys, monkeypatch)
    assert code == 1 and stderr.startswith("error: ") and stderr.count("\n") == 1 and not out.exists()

    code, stdout, stderr = run([*args, "--checkpoint", str(folder), "--json"], capsys, monkeypatch)
    assert (code, stderr) == (0, "")
    deltas_a, deltas_b = kohya_deltas(load_file(path_a)), kohya_deltas(load_file(path_b))
    expected = {}
    for module, (_, in_a, b_name) in TINY.items():
        name = tiny_kohya_name(module)
        expected[name] = (W_A * deltas_a[name] if in_a else 0) + (W_B * deltas_b[b_name] if b_name else 0)
    merged = kohya_deltas(load_file(out))
    assert set(merged) == set(expected)
    for name, delta in expected.items():
        assert float(torch.linalg.norm(merged[name] - delta)) <= 1e-6 * float(delta.norm()), name
    report = json.loads(stdout)
    assert report["checkpoint"] == str(folder) and report["base"] == "sd1"
    assert [i["format"] for i in report["inputs"]] == ["kohya", "lycoris"]

    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["modelspec.merged_from"] == f"{path_a.name}, {path_b.name}"  # nothing of the checkpoint is in it
    operation = json.loads(metadata["adapterzoo.operation"])
    assert [i["name"] for i in operation["inputs"]] == [path_a.name, path_b.name]
    assert operation["checkpoint"] == {
        "name": folder.name,
        "sha256": {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in folder.rglob("*") if p.is_file()}}


def test_checkpoint_refuses_a_lora_for_another_base_before_writing(tiny, tmp_path, capsys, monkeypatch):
    folder, path_a, _ = tiny
    sd2 = {}  # the tiny SD2's cross-attention: 1024 wide, as probe tells SD2 apart
    write_pair(sd2, "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (32, 1024), 2, 1.0,
               torch.Generator().manual_seed(8))
    path_sd2 = tmp_path / "tiny_sd2.safetensors"
    save_file(sd2, str(path_sd2))
    out = tmp_path / "x.safetensors"
    code, _, stderr = run(["merge-loras", str(path_a), str(path_sd2), "-o", str(out), "--checkpoint", str(folder)],
                          capsys, monkeypatch)
    assert code == 1 and stderr.count("\n") == 1 and not out.exists()
    assert f"{path_sd2.name} is a sd2 lora but {folder.name} is a sd1 checkpoint" in stderr
