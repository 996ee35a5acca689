"""The verify queue on SQLite and on PostgreSQL: jobs queued once, taken by one worker each, leases that run
out when a worker dies, a file two workers died on recorded as a fail, results recorded exactly once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from adapterzoo import __version__
from adapterzoo.zoo.db import connect
from adapterzoo.zoo.models import FileEntry, Verification, VerifyJob
from adapterzoo.zoo.queries import list_entries
from adapterzoo.zoo.scan import scan_paths
from adapterzoo.zoo.verify_queue import Worker, enqueue, queue_status

CKPT = "c" * 64
SETTINGS = "s" * 64
SHORT_LEASE_S = 0.3  # long enough for a take and a finish on a loaded machine, short enough to wait out


@pytest.fixture
def engine(registry_db: str) -> Engine:
    return connect(registry_db)


def library(engine: Engine, folder: Path, count: int) -> list[FileEntry]:
    """`count` indexed files (their content does not matter to the queue)."""
    folder.mkdir()
    for i in range(count):
        (folder / f"f{i:03d}.safetensors").write_bytes(b"file %d" % i)
    scan_paths([folder], engine)
    return list_entries(engine)


def queue(engine: Engine, entries: list[FileEntry], settings: str = SETTINGS) -> int:
    return enqueue(engine, [(entry, Path("/models/ckpt.safetensors"), CKPT) for entry in entries], settings)


def result(verdict: str = "pass") -> dict[str, Any]:
    return {"checkpoint": "/models/ckpt.safetensors", "checkpoint_sha256": CKPT, "verdict": verdict, "reasons": [],
            "coverage": None, "effects": [], "grid": None, "parameters": {}, "seconds": 0.1, "version": __version__}


def jobs(engine: Engine) -> list[VerifyJob]:
    with Session(engine) as session:
        return list(session.scalars(select(VerifyJob).order_by(VerifyJob.id)))


def verifications_per_file(engine: Engine) -> dict[int, int]:
    with Session(engine) as session:
        return dict(session.execute(select(Verification.file_id, func.count()).group_by(Verification.file_id)).all())


def test_workers_started_with_the_same_flags_queue_each_job_once(engine, tmp_path):
    entries = library(engine, tmp_path / "lib", 5)
    assert queue(engine, entries) == 5
    assert queue(engine, entries) == 0  # a second worker with the same flags
    assert queue(engine, entries[:2], settings="t" * 64) == 2  # other settings are other jobs
    assert [j.state for j in jobs(engine)] == ["queued"] * 7


def test_two_workers_take_different_jobs_and_each_result_is_recorded_once(engine, tmp_path):
    entries = library(engine, tmp_path / "lib", 6)
    queue(engine, entries)
    with Worker(engine, {CKPT}, SETTINGS, 60) as a, Worker(engine, {CKPT}, SETTINGS, 60) as b:
        first, second = a.take(2), b.take(2)
        assert len(first) == len(second) == 2 and not {j.id for j in first} & {j.id for j in second}
        assert Worker(engine, {"other" * 12}, SETTINGS, 60).take(5) == []  # no job on a checkpoint it lacks
        assert Worker(engine, {CKPT}, "t" * 64, 60).take(5) == []  # nor with other settings
        assert all(a.finish(job, result()) for job in first)
        status = queue_status(engine)
        assert (status["queued"], status["running"], status["done"]) == (2, 2, 2)
        assert status["running_by_host"] == {b.host: 2}
    # leaving gives back what b still held, with no crash counted
    assert [(j.state, j.crashes) for j in jobs(engine)] == [("done", 0)] * 2 + [("queued", 0)] * 4
    assert verifications_per_file(engine) == {job.file_id: 1 for job in first}


def test_a_dead_workers_job_is_taken_back_after_its_lease_and_done_once(engine, tmp_path):
    entries = library(engine, tmp_path / "lib", 3)
    queue(engine, entries)
    dead = Worker(engine, {CKPT}, SETTINGS, SHORT_LEASE_S)  # never entered: no heartbeat, as if killed
    held = dead.take(2)
    with Worker(engine, {CKPT}, SETTINGS, 60) as alive:
        assert [j.id for j in alive.take(5)] == [jobs(engine)[2].id]  # the dead one's are still leased
        time.sleep(SHORT_LEASE_S + 0.2)
        again = next(alive.batches(5))
        assert [j.id for j in again] == [j.id for j in held]
        assert not dead.finish(held[0], result())  # its lease ran out: the late result is not recorded
        assert all(alive.finish(job, result()) for job in again)
    by_id = {j.id: j for j in jobs(engine)}
    # the lowest of its jobs is the one it was verifying: that one is blamed, the other was only waiting
    assert [by_id[j.id].crashes for j in held] == [1, 0]
    assert verifications_per_file(engine) == {j.file_id: 1 for j in held}


def test_a_file_two_workers_died_on_is_recorded_as_a_fail_not_retried(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERZOO_HOST", "node7")
    entries = library(engine, tmp_path / "lib", 1)
    queue(engine, entries)
    for _ in range(2):
        dying = Worker(engine, {CKPT}, SETTINGS, SHORT_LEASE_S)
        assert len(dying.take(1)) == 1
        time.sleep(SHORT_LEASE_S + 0.2)
    with Worker(engine, {CKPT}, SETTINGS, 60) as survivor:
        assert survivor.take(1) == []
        assert survivor.next_chance_s() is None  # nothing left to wait for
    (job,) = jobs(engine)
    assert (job.state, job.crashes) == ("failed", 2)
    with Session(engine) as session:
        verification = session.get(Verification, job.verification_id)
    assert verification.verdict == "fail" and verification.file_id == entries[0].id
    assert verification.reasons == ["a verify worker died on this file 2 times (last on node7): not retried"]
    status = queue_status(engine)
    assert (status["failed"], status["done"], status["queued"]) == (1, 0, 0)


def test_a_worker_renews_its_lease_while_it_lives(engine, tmp_path):
    entries = library(engine, tmp_path / "lib", 1)
    queue(engine, entries)
    lease_s = 1.5  # renewed every 0.5 s: a heartbeat late by a second on a busy machine still keeps it
    with Worker(engine, {CKPT}, SETTINGS, lease_s) as slow:
        (job,) = slow.take(1)
        time.sleep(2 * lease_s + 0.2)  # only the heartbeat keeps the job its own
        with Worker(engine, {CKPT}, SETTINGS, 60) as other:
            assert other.take(1) == []
            assert 0 < other.next_chance_s() <= lease_s + 0.1
        assert slow.finish(job, result())
    assert [(j.state, j.crashes) for j in jobs(engine)] == [("done", 0)]


def test_a_worker_takes_only_files_it_can_read(engine, tmp_path):
    entries = library(engine, tmp_path / "lib", 3)
    queue(engine, entries)
    (tmp_path / "lib" / "f001.safetensors").unlink()  # as if on another machine's disk
    with Worker(engine, {CKPT}, SETTINGS, 60) as worker:
        taken = worker.take(5)
        assert sorted(Path(j.path).name for j in taken) == ["f000.safetensors", "f002.safetensors"]
        assert all(worker.finish(job, result("fail")) for job in taken)
        assert worker.take(5) == [] and worker.next_chance_s() is None
    status = queue_status(engine)
    assert (status["queued"], status["done"], status["pass"], status["fail"]) == (1, 2, 0, 2)
    assert status["per_minute"] > 0 and abs(status["seconds_left"] - 60 / status["per_minute"]) <= 1


def test_a_worker_takes_only_files_its_host_can_read_own_or_on_a_shared_root(engine, tmp_path, cli, registry_db,
                                                                            monkeypatch):
    """Host a has a file of its own and a NAS that b mounts elsewhere: b's worker takes the NAS file, at b's
    path, and leaves a's own file to a's worker."""
    from library_layout import lora

    own = lora(tmp_path / "a-disk" / "own.safetensors")
    nas_a, nas_b = tmp_path / "nas-on-a", tmp_path / "nas-on-b"
    lora(nas_a / "team.safetensors", seed=1)
    cli.json("roots", "add", nas_a, "--shared", "--mount", f"b={nas_b}", host="a")
    nas_b.symlink_to(nas_a)
    cli.json("scan", own.parent, host="a")
    cli.json("scan", host="a")
    queue(engine, list_entries(engine))
    monkeypatch.setenv("ADAPTERZOO_HOST", "b")
    with Worker(engine, {CKPT}, SETTINGS, 60) as on_b:
        taken = on_b.take(5)
        assert [job.path for job in taken] == [str(nas_b / "team.safetensors")]
        on_b.finish(taken[0], result())
    monkeypatch.setenv("ADAPTERZOO_HOST", "a")
    with Worker(engine, {CKPT}, SETTINGS, 60) as on_a:
        assert [job.path for job in on_a.take(5)] == [str(own)]
