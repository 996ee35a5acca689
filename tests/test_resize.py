"""`adapterzoo resize` through the real entry point: every module comes out as the optimal truncation.

The reference is plain torch on explicit matrices: ΔW = alpha / r · up @ down (Tucker: through the
mid) in float64, its thin SVD, and the rules written out here from their definitions.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import factory
import pytest
import torch
from cli_helpers import run
from deltas import kohya_deltas
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapterzoo.formats.lora.lora_model import LoraModule
from adapterzoo.formats.lora.lora_read import load_lora
from adapterzoo.formats.probe import probe

RANK = 12
LINEAR = r"down_blocks\.1\.attentions\.0\.(proj_in|transformer_blocks\.0\.(attn2\.to_k|ff\.net\.0\.proj))$"
CONV = r"(down_blocks\.1\.resnets\.0\.conv1|down_blocks\.0\.downsamplers\.0\.conv)$"
TE = r"layers_0_(self_attn_q_proj|mlp_fc2)$"




def spectrum_factors(shape: tuple[int, ...], rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) whose product has singular values falling off like 0.8^i, so the rules keep different ranks."""
    out, inner = shape[0], math.prod(shape[1:])
    q_out = torch.linalg.qr(torch.randn(out, rank, generator=gen)).Q
    q_in = torch.linalg.qr(torch.randn(inner, rank, generator=gen)).Q
    s = 0.8 ** torch.arange(rank, dtype=torch.float32)
    return (s[:, None] * q_in.T), q_out


@pytest.fixture(scope="session")
def lora_file(tmp_path_factory) -> Path:
    """SD1 kohya/LyCORIS LoRA at real widths, fp32, rank 12: linears, a 1x1 conv, a 3x3 LoCon conv, a Tucker
    conv, one module without alpha; alphas differ so the scale matters."""
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    targets = {k: v for k, v in factory.te_targets("clip_l", "lora_te").items() if re.search(TE, k)}
    targets |= factory.unet_targets("sd1", ldm=False, pattern=LINEAR)
    for i, (name, shape) in enumerate(targets.items()):
        down, up = spectrum_factors(shape, RANK, gen)
        sd[f"{name}.lora_down.weight"] = down.reshape(RANK, *shape[1:])
        sd[f"{name}.lora_up.weight"] = up.reshape(shape[0], RANK, *([1, 1] if len(shape) == 4 else []))
        if i:
            sd[f"{name}.alpha"] = torch.tensor(float(i + 3))
    tucker_conv, plain_conv = factory.unet_targets("sd1", ldm=False, pattern=CONV).items()
    name, shape = plain_conv
    down, up = spectrum_factors(shape, RANK, gen)
    sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down.reshape(RANK, *shape[1:]), up[..., None, None]
    sd[f"{name}.alpha"] = torch.tensor(6.0)
    name, shape = tucker_conv
    sd[f"{name}.lora_down.weight"] = torch.randn(RANK, shape[1], 1, 1, generator=gen) * 0.1
    sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], RANK, 1, 1, generator=gen) * 0.1
    sd[f"{name}.lora_mid.weight"] = torch.randn(RANK, RANK, 3, 3, generator=gen)
    sd[f"{name}.alpha"] = torch.tensor(4.0)
    metadata = {"ss_network_dim": str(RANK), "ss_network_alpha": "4", "sshs_model_hash": "0" * 64,
                "modelspec.hash_sha256": "0x" + "0" * 64, "ss_output_name": "styled"}
    path = tmp_path_factory.mktemp("resize") / "styled.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="session")
def reference(lora_file) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (ΔW float64, its singular values)."""
    deltas = kohya_deltas(load_file(lora_file))
    return {name: (delta, torch.linalg.svdvals(delta)) for name, delta in deltas.items()}


def retained(s: torch.Tensor, k: int) -> float:
    return float(s[:k].norm() / s.norm())


def test_rank_gives_the_optimal_truncation_with_alphas_that_scale_right(lora_file, reference, tmp_path, capsys,
                                                                        monkeypatch):
    out = tmp_path / "styled-r4.safetensors"
    code, stdout, stderr = run(["resize", str(lora_file), "-o", str(out), "--rank", "4", "--json"], capsys, monkeypatch)
    assert (code, stderr) == (0, "")
    report = json.loads(stdout)
    written = load_file(out)
    deltas = kohya_deltas(written)
    assert set(deltas) == set(reference)
    rows = {row["module"]: row for row in report["modules"]}
    kept_energy = total_energy = 0.0
    for name, (full, s) in reference.items():
        error = float(torch.linalg.norm(full - deltas[name]))
        assert error == pytest.approx(float(s[4:].norm()), rel=1e-4), name  # Eckart–Young: the least possible
        u, _, vh = torch.linalg.svd(full, full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        assert float(torch.linalg.norm(deltas[name] - best)) <= 1e-4 * float(best.norm()), name
        assert written[f"{name}.lora_down.weight"].shape[0] == 4 and float(written[f"{name}.alpha"]) == 4.0
        assert rows[name]["rank"] == RANK and rows[name]["kept_rank"] == 4
        assert rows[name]["retained_fro"] == pytest.approx(retained(s, 4), rel=1e-5)
        kept_energy += float(s[:4].square().sum())
        total_energy += float(s.square().sum())
    assert report["retained_fro"] == pytest.approx(math.sqrt(kept_energy / total_energy), rel=1e-5)
    tucker = next(n for n in reference if "downsamplers" in n)  # its mid was folded into a plain 3x3 down
    assert written[f"{tucker}.lora_down.weight"].shape == (4, 320, 3, 3) and f"{tucker}.lora_mid.weight" not in written


def test_output_loads_back_carries_provenance_and_drops_stale_hashes(lora_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "styled-r4.safetensors"
    code, stdout, _ = run(["resize", str(lora_file), "-o", str(out), "--rank", "4"], capsys, monkeypatch)
    assert code == 0
    assert "retained" in stdout and f"wrote    {out}" in stdout and "lora_te_text_model_encoder_layers_0" in stdout
    lora = load_lora(out)
    assert lora.base == "sd1" and len(lora.modules) == 7
    assert all(isinstance(m, LoraModule) and m.rank == 4 and m.mid is None for m in lora.modules.values())
    result = probe(out)
    assert (result.kind, result.base, result.format, result.rank) == ("lora", "sd1", "kohya", 4)
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_output_name"] == "styled"
    assert "sshs_model_hash" not in metadata and "modelspec.hash_sha256" not in metadata
    operation = json.loads(metadata["adapterzoo.operation"])
    assert operation["op"] == "resize" and operation["rule"] == {"rank": 4} and operation["device"] == "cpu"
    digest = hashlib.sha256(lora_file.read_bytes()).hexdigest()
    assert operation["inputs"] == [{"name": lora_file.name, "sha256": digest}]
    assert operation["version"]


def smallest_rank(s: torch.Tensor, rule: str, x: float) -> int:
    """The rules from their definitions (kohya resize_lora's sv_ratio/sv_fro/sv_cumulative)."""
    values = s.tolist()
    if rule == "--sv-ratio":
        return sum(v >= values[0] / x for v in values)
    if rule == "--sv-fro":
        return next(k for k in range(1, len(values) + 1) if retained(s, k) >= x)
    return next(k for k in range(1, len(values) + 1) if sum(values[:k]) >= x * sum(values))


@pytest.mark.parametrize(("rule", "x"), [("--sv-fro", 0.9), ("--sv-ratio", 4.0), ("--sv-cumulative", 0.7)])
def test_dynamic_rules_keep_the_rank_their_definition_asks_for(rule, x, lora_file, reference, tmp_path, capsys,
                                                               monkeypatch):
    out = tmp_path / "dynamic.safetensors"
    code, stdout, _ = run(["resize", str(lora_file), "-o", str(out), rule, str(x), "--json"], capsys, monkeypatch)
    assert code == 0
    rows = {row["module"]: row for row in json.loads(stdout)["modules"]}
    deltas = kohya_deltas(load_file(out))
    kept = set()
    for name, (full, s) in reference.items():
        k = smallest_rank(s, rule, x)
        kept.add(k)
        assert rows[name]["kept_rank"] == k, name
        error = float(torch.linalg.norm(full - deltas[name]))
        assert error == pytest.approx(float(s[k:].norm()), rel=1e-4, abs=1e-5 * float(s[0])), name
        if rule == "--sv-fro":
            assert rows[name]["retained_fro"] >= x
    assert len(kept) > 1  # the rule really is per module here
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_fp16_files_stay_fp16_and_bundled_embeddings_pass_through(tmp_path, capsys, monkeypatch):
    case = factory.CASES["kohya-sd1"](tmp_path)
    sd = load_file(case.path)
    embedding = torch.randn(2, 768, generator=torch.Generator().manual_seed(1)).half()
    sd["bundle_emb.styled.string_to_param.*"] = embedding
    src = tmp_path / "bundled.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "r2.safetensors"
    code, stdout, _ = run(["resize", str(src), "-o", str(out), "--rank", "2", "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(stdout)["passed_through"] == 1
    written = load_file(out)
    assert torch.equal(written["bundle_emb.styled.string_to_param.*"], embedding)
    downs = [t for k, t in written.items() if k.endswith("lora_down.weight")]
    assert len(downs) == 264 and all(t.dtype == torch.float16 and t.shape[0] == 2 for t in downs)


@pytest.mark.parametrize(("case", "says"), [
    ("lycoris-ia3", "IA3 module(s)"),
    ("lycoris-dora", "DoRA"),
    ("diffusers", "--to kohya"),
])
def test_files_resize_cannot_truncate_are_refused_in_one_line(case, says, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    if case == "diffusers":
        src = folder / "pytorch_lora_weights.safetensors"
        prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        save_file({f"{prefix}.lora_A.weight": torch.zeros(4, 768), f"{prefix}.lora_B.weight": torch.zeros(320, 4)},
                  str(src))
    else:
        src = factory.CASES[case](folder).path
    out = tmp_path / "out.safetensors"
    code, _, stderr = run(["resize", str(src), "-o", str(out), "--rank", "2"], capsys, monkeypatch)
    assert code == 1 and stderr.startswith("error: ") and says in stderr and stderr.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("args", [[], ["--rank", "2", "--sv-fro", "0.5"], ["--rank", "0"], ["--sv-fro", "1.5"]])
def test_rank_rule_usage_errors_exit_2(args, lora_file, tmp_path, capsys, monkeypatch):
    code, _, stderr = run(["resize", str(lora_file), "-o", str(tmp_path / "o.safetensors"), *args], capsys, monkeypatch)
    assert code == 2 and "Error" in stderr


def test_resize_imports_neither_diffusers_nor_transformers(lora_file, tmp_path):
    """A resize needs no architecture table: start-up stays at Python + torch."""
    out = tmp_path / "light.safetensors"
    script = ("import sys\nfrom adapterzoo.cli import main\n"
              f"sys.argv = ['adapterzoo', 'resize', {str(lora_file)!r}, '-o', {str(out)!r}, '--rank', '2']\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
              "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]" and out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result(lora_file, tmp_path, capsys, monkeypatch):
    outputs = {}
    for device in ("cpu", "cuda"):
        outputs[device] = tmp_path / f"{device}.safetensors"
        code, _, stderr = run(["resize", str(lora_file), "-o", str(outputs[device]), "--rank", "4", "--device", device],
                              capsys, monkeypatch)
        assert code == 0, stderr
    cpu, cuda = kohya_deltas(load_file(outputs["cpu"])), kohya_deltas(load_file(outputs["cuda"]))
    for name in cpu:
        assert float(torch.linalg.norm(cpu[name] - cuda[name])) <= 1e-4 * float(cpu[name].norm()), name


def test_the_input_is_never_overwritten(lora_file, tmp_path, capsys, monkeypatch):
    copy = Path(shutil.copy(lora_file, tmp_path / "mine.safetensors"))
    before = copy.read_bytes()
    code, _, stderr = run(["resize", str(copy), "-o", str(copy), "--rank", "2", "--force"], capsys, monkeypatch)
    assert code == 1 and "one of the inputs" in stderr and copy.read_bytes() == before
