"""How many CPU threads torch gets, decided in one place (devices.cpu_threads) for every command that computes:
--threads N, else OMP_NUM_THREADS, else the cores this process may use (its affinity, not the machine's count);
and idle OpenMP workers sleep instead of spinning unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import run
from safetensors.torch import save_file

from adapterzoo.devices import cpu_threads

NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture
def lora(tmp_path: Path) -> Path:
    path = tmp_path / "lora.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({f"{NAME}.lora_down.weight": torch.randn(4, 768, generator=gen),
               f"{NAME}.lora_up.weight": torch.randn(320, 4, generator=gen), f"{NAME}.alpha": torch.tensor(4.0)},
              str(path))
    return path


@pytest.fixture
def torch_threads():
    """Whatever a command sets, the suite goes on with the threads it had."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_decision_prefers_the_flag_then_the_environment_then_the_usable_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert cpu_threads(7) == 7
    assert cpu_threads() == 4
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads() == 3  # the three cores this process may use, not os.cpu_count()


@pytest.mark.parametrize(("args", "env", "threads"), [
    (["--threads", "3"], "1", 3),
    ([], "2", 2),
    ([], None, 5),
])
def test_a_command_gives_torch_the_threads_decided(args, env, threads, lora, tmp_path, capsys, monkeypatch,
                                                   torch_threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(5)), raising=False)
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    torch.set_num_threads(1)
    code, _, stderr = run([*args, "resize", str(lora), "-o", str(tmp_path / "r.safetensors"), "--rank", "2"],
                          capsys, monkeypatch)
    assert code == 0, stderr
    assert torch.get_num_threads() == threads


def test_threads_below_one_are_a_usage_error(lora, tmp_path, capsys, monkeypatch):
    code, _, stderr = run(["--threads", "0", "resize", str(lora), "-o", str(tmp_path / "r.safetensors"), "--rank",
                           "2"], capsys, monkeypatch)
    assert code == 2 and "--threads" in stderr


SCRIPT = """
import os, sys
from adapterzoo.cli import main
assert "torch" not in sys.modules  # so the policy main() sets reaches OpenMP when a command loads torch
sys.argv = ["adapterzoo", "resize", sys.argv[1], "-o", sys.argv[2], "--rank", "2"]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
import torch
print(torch.get_num_threads(), os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
@pytest.mark.parametrize(("policy", "seen"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_a_process_pinned_to_one_core_computes_on_one_thread_and_openmp_waits_passively(policy, seen, lora,
                                                                                        tmp_path):
    """The wait policy has to be in the environment before torch loads OpenMP: the entry point sets it first."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    core = min(os.sched_getaffinity(0))
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(lora), str(tmp_path / "r.safetensors")], env=env,
                            check=False, capture_output=True, text=True, timeout=300,
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].split() == ["1", seen]
