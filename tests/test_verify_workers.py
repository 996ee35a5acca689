"""Worker processes sharing the registry's verify queue, one killed with SIGKILL while it holds a job: still
every file is verified exactly once, and the killed worker's job is finished by another after its lease. Four
`verify --registry --worker` processes on 200 files on PostgreSQL; the queue alone (no rendering) on SQLite and
PostgreSQL; one worker through the command line on SQLite, with `--status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from test_verify_library import FAST as LIBRARY_FAST
from test_verify_library import Runs, sheet_of
from test_verify_library import library as library_folder
from test_verify_queue import CKPT, SETTINGS, library

from adapterzoo import tiny_models
from adapterzoo.zoo.db import connect
from adapterzoo.zoo.models import FileEntry, Verification, VerifyJob
from adapterzoo.zoo.scan import scan_paths
from adapterzoo.zoo.verify_queue import enqueue

FAST = ["--steps", "1", "--size", "32x32", "--multiplier", "1"]  # little work per file: the point is coordination
WORKERS = 4
LEASE_S = 2
FILES = 200
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A tiny SD1 checkpoint and 200 one-module LoRAs."""
    root = tmp_path_factory.mktemp("library")
    tiny_models.save_tiny_pipeline("sd1", root / "Stable-diffusion" / "tiny-sd1", seed=1)
    out_features, in_features = tiny_models.tiny_pipeline("sd1", 1).unet.down_blocks[0].attentions[0] \
        .transformer_blocks[0].attn2.to_k.weight.shape
    (root / "Lora").mkdir()
    for i in range(FILES):
        g = torch.Generator().manual_seed(i)
        save_file({f"{TO_K}.lora_down.weight": torch.randn(2, in_features, generator=g),
                   f"{TO_K}.lora_up.weight": torch.randn(out_features, 2, generator=g),
                   f"{TO_K}.alpha": torch.tensor(2.0)}, str(root / "Lora" / f"l{i:03d}.safetensors"))
    return root


@pytest.fixture
def checkpoint(models: Path) -> Path:
    return models / "Stable-diffusion" / "tiny-sd1"


@pytest.fixture
def cli(capsys, monkeypatch) -> Runs:
    return Runs(capsys, monkeypatch)


def worker_jobs(engine: Engine, pid: int) -> tuple[int, list[VerifyJob]]:
    """(jobs done, jobs running) of the worker process `pid`, as committed in the registry."""
    with Session(engine) as session:
        rows = list(session.scalars(select(VerifyJob).where(VerifyJob.worker.like(f"%:{pid}:%")).order_by(VerifyJob.id)))
    return sum(j.state == "done" for j in rows), [j for j in rows if j.state == "running"]


def kill_while_holding_a_job(engine: Engine, victim: subprocess.Popen) -> list[VerifyJob]:
    """SIGKILL `victim` once it has done a few jobs and holds one (frozen with SIGSTOP first, so the jobs it
    holds are known for certain); the jobs it held."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        done, running = worker_jobs(engine, victim.pid)
        if done >= 3 and running:
            victim.send_signal(signal.SIGSTOP)
            time.sleep(0.3)  # a commit it sent before it stopped lands in the database meanwhile
            held = worker_jobs(engine, victim.pid)[1]
            if held:
                victim.kill()
                victim.wait()
                return held
            victim.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"worker {victim.pid} never held a job (exit code {victim.poll()})")


# A worker of the queue alone: each job takes 20 ms and passes.
QUEUE_WORKER = """
import sys, time
from adapterzoo import __version__
from adapterzoo.zoo.db import connect
from adapterzoo.zoo.verify_queue import Worker
url, checkpoint_sha256, settings, lease_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
result = {"checkpoint": "/models/ckpt.safetensors", "checkpoint_sha256": checkpoint_sha256, "verdict": "pass",
          "reasons": [], "coverage": None, "effects": [], "grid": None, "parameters": {}, "seconds": 0.02,
          "version": __version__}
with Worker(connect(url), {checkpoint_sha256}, settings, lease_s) as worker:
    for jobs in worker.batches(2):
        for job in jobs:
            time.sleep(0.02)
            worker.finish(job, result)
"""


def assert_each_file_done_once(engine: Engine, files: set[int], held: list[VerifyJob], victim: int) -> None:
    """Every job done, one verification per file; the victim's held jobs done by another worker after its lease,
    one crash counted (the job it was on)."""
    with Session(engine) as session:
        jobs = {j.id: j for j in session.scalars(select(VerifyJob))}
        per_file = dict(session.execute(select(Verification.file_id, func.count()).group_by(Verification.file_id)).all())
    assert len(jobs) == len(files)
    assert [j for j in jobs.values() if j.state != "done"] == [], "not done: " + ", ".join(
        f"{j.id} {j.state} by {j.worker} ({j.crashes} crashes)" for j in jobs.values() if j.state != "done")
    assert {f: n for f, n in per_file.items() if n != 1} == {} and files - per_file.keys() == set()
    for job in held:
        after = jobs[job.id]
        assert f":{victim}:" not in after.worker and after.started >= job.lease_until, \
            (job.lease_until, after.worker, after.started)
    assert [jobs[j.id].crashes for j in held] == [1] + [0] * (len(held) - 1)  # blamed: the one it was on


def test_queue_workers_one_killed_do_every_job_exactly_once(registry_db, tmp_path):
    engine = connect(registry_db)
    entries = library(engine, tmp_path / "lib", FILES)
    enqueue(engine, [(entry, Path("/models/ckpt.safetensors"), CKPT) for entry in entries], SETTINGS)
    workers = [subprocess.Popen([sys.executable, "-c", QUEUE_WORKER, registry_db, CKPT, SETTINGS, str(LEASE_S)],
                                stderr=subprocess.PIPE, text=True)
               for _ in range(WORKERS)]
    held = kill_while_holding_a_job(engine, workers[0])
    for worker in workers[1:]:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()[-2000:]
    assert_each_file_done_once(engine, {e.id for e in entries}, held, workers[0].pid)
    engine.dispose()


def test_four_workers_one_killed_verify_every_file_exactly_once(models, postgres_url, monkeypatch, tmp_path):
    monkeypatch.setenv("ADAPTERZOO_DB", postgres_url)
    engine = connect(postgres_url)
    assert scan_paths([models], engine).indexed == FILES + 1
    out = tmp_path / "checks"
    workers = [subprocess.Popen(
        [sys.executable, "-m", "adapterzoo", "verify", "--registry", "--worker", "--lease", str(LEASE_S),
         "--out-dir", str(out), *FAST, "--json"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(WORKERS)]
    held = kill_while_holding_a_job(engine, workers[0])
    outputs = [worker.communicate(timeout=600) for worker in workers[1:]]
    for worker, (stdout, stderr) in zip(workers[1:], outputs):
        assert worker.returncode == 0, (stderr[-2000:], [r for r in json.loads(stdout or "[]") if r["verdict"] != "pass"])

    with Session(engine) as session:
        loras = set(session.scalars(select(FileEntry.id).where(FileEntry.kind == "lora")))
    assert len(loras) == FILES
    assert_each_file_done_once(engine, loras, held, workers[0].pid)

    survivors = [r["file"] for stdout, _ in outputs for r in json.loads(stdout)]
    assert len(survivors) == len(set(survivors))
    assert len(survivors) == FILES - worker_jobs(engine, workers[0].pid)[0]
    assert sorted(c["data-verdict"] for c in sheet_of(out).cards) == ["pass"] * FILES  # the whole queue's sheet

    status = subprocess.run([sys.executable, "-m", "adapterzoo", "verify", "--registry", "--status", "--json"],
                            capture_output=True, text=True, check=False)
    assert status.returncode == 0, status.stderr
    assert {k: json.loads(status.stdout)[k] for k in ("queued", "running", "done", "pass", "failed")} == \
           {"queued": 0, "running": 0, "done": FILES, "pass": FILES, "failed": 0}
    engine.dispose()


def test_a_worker_through_the_command_line_on_sqlite(checkpoint, tmp_path, cli):
    """One worker verifies what its flags select (bad entries reported, not queued); a second run with the same
    flags finds it all done; --status counts the queue."""
    models = library_folder(tmp_path, checkpoint)
    assert cli("scan", models)[0] == 0
    (models / "Lora" / "changed.safetensors").write_bytes(b"not a safetensors file at all")
    out = tmp_path / "out"
    code, stdout, stderr = cli("verify", "--registry", "--worker", "--out-dir", out, *LIBRARY_FAST)
    assert code == 1, stderr
    rows = {line.split()[3]: line.split()[0] for line in stdout.splitlines()[1:7]}
    assert rows == {"good.safetensors": "pass", "zero.safetensors": "fail", "changed.safetensors": "fail",
                    "half.safetensors": "fail", "needs-code.ckpt": "fail", "xl.safetensors": "fail"}
    assert "3 verified: 1 pass, 2 fail; 3 skipped (1 broken, 1 unsafe, 1 no checkpoint); 1 left out (checkpoint)" \
           in stdout
    assert "queue: 0 queued, 0 running, 3 done (1 pass, 2 fail), 0 failed" in stdout
    assert sorted(c["data-verdict"] for c in sheet_of(out).cards) == ["fail", "fail", "pass"]

    code, stdout, _ = cli("verify", "--registry", "--worker", "--out-dir", out, *LIBRARY_FAST)
    assert "0 verified: 0 pass, 0 fail" in stdout and "3 done (1 pass, 2 fail)" in stdout  # nothing twice
    code, stdout, _ = cli("verify", "--registry", "--status")
    assert code == 0
    assert [line.split()[:2] for line in stdout.splitlines()[1:5]] == [["queued", "0"], ["running", "0"],
                                                                       ["done", "3"], ["failed", "0"]]
    assert "1 pass, 2 fail" in stdout.splitlines()[3] and "files/min" in stdout


@pytest.mark.parametrize("args, message", [
    (["--registry", "--status", "--worker"], "give one"),
    (["--registry", "--out-dir", "out", "--lease", "5"], "--lease is for --worker"),
    (["FILE", "--checkpoint", "CKPT", "--worker"], "--worker: only with --registry"),
])
def test_worker_flags_need_their_mode(args, message, checkpoint, tmp_path, cli):
    args = [str(checkpoint) if a in ("FILE", "CKPT") else a for a in args]
    code, stdout, stderr = cli("verify", *args)
    assert code == 2 and stdout == ""
    assert message in stderr
