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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterzoo.formats.lora_read import load_lora
from adapterzoo.formats.probe import probe

LINEAR = r"down_blocks\.1\.attentions\.0\.(proj_in|transformer_blocks\.0\.(attn1\.to_q|attn2\.to_k))$"
CONV = r"down_blocks\.1\.resnets\.0\.conv1$"
ONLY_B = r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.ff\.net\.2$"
TE = ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_mlp_fc1")
W_A, W_B = 0.7, -0.4




def kohya_deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module -> alpha / r · up @ down (Tucker: through the mid) as a float64 [out, in·k·k] matrix."""
    out = {}
    for key, tensor in sd.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        down, up = tensor.double(), sd[f"{name}.lora_up.weight"].double()
        rank = down.shape[0]
        up2 = up.reshape(up.shape[0], rank)
        if f"{name}.lora_mid.weight" in sd:
            mid = sd[f"{name}.lora_mid.weight"].double()
            delta = torch.einsum("oa,abhw,bi->oihw", up2, mid, down.reshape(rank, -1)).reshape(up.shape[0], -1)
        else:
            delta = up2 @ down.reshape(rank, -1)
        out[name] = delta * float(sd[f"{name}.alpha"]) / rank
    return out


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


def test_lycoris_modules_that_are_no_factor_pair_are_refused(inputs, tmp_path, capsys, monkeypatch):
    loha = factory.CASES["lycoris-loha"](tmp_path).path
    code, _, stderr = run(["merge-loras", str(inputs[0]), str(loha), "-o", str(tmp_path / "x.safetensors")],
                          capsys, monkeypatch)
    assert code == 1 and f"{loha} has 224 Loha module(s)" in stderr and "--rank N" in stderr


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
