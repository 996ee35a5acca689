"""`verify --registry --worker`: one of any number of processes, on one machine or many, that verify the library
together through the registry's verify queue (zoo/verify_queue.py).

Each worker first queues what its flags select (verify_library's selection; a job another worker with the same
flags queued is not queued again), then takes jobs on the checkpoints it has until none is left that it could
take, waiting out the lease of a job whose worker may have died. Like verify_library it joins verify/ and zoo/,
so it lives beside cli/. It holds one checkpoint's pipeline at a time and asks for jobs on that one first.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable
from functools import cache
from hashlib import sha256
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from tqdm import tqdm

from adapterzoo.verify.contact_sheet import write_contact_sheet
from adapterzoo.verify.verifier import Verifier, VerifyOptions, digest_of
from adapterzoo.verify_library import (
    LibraryReport,
    baseline_cache,
    error_line,
    failed_result,
    group_checkpoint,
    select_library,
    unopened_result,
    verify_entry,
)
from adapterzoo.zoo.models import FileEntry
from adapterzoo.zoo.verify_queue import Job, Worker, enqueue, finished_results

BATCH = 1  # jobs taken at a time: a verify takes seconds, so one is cheap to take and keeps the workers even
DEFAULT_LEASE_S = 60.0


def settings_digest(options: VerifyOptions) -> str:
    """The render settings a job is done with. Not the device: a job may be rendered by any worker's."""
    chosen = {name: value for name, value in dataclasses.asdict(options).items() if name != "device"}
    return sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()


def queue_library(engine: Engine, settings: str, sha256_of: Callable[[Path], Any], kind: str | None,
                  base: str | None, unverified: bool, checkpoints: bool, given: dict[str, Path]
                  ) -> tuple[dict[str, Path], LibraryReport]:
    """Queue what the flags select; the checkpoints this worker has (SHA-256 -> path here), and a report of the
    entries not queued (unsafe, broken, missing, no checkpoint) and the kinds left out."""
    groups, report = select_library(engine, kind, base, unverified, checkpoints)
    local: dict[str, Path] = {}
    jobs = []
    for entries in groups.values():
        found = _checkpoint_here(engine, entries, given, sha256_of)
        if isinstance(found, str):
            report.results += [unopened_result(entry, "no checkpoint", found) for entry in entries]
            continue
        checkpoint, digest = found
        local[digest] = checkpoint
        jobs += [(entry, checkpoint, digest) for entry in entries]
    enqueue(engine, jobs, settings)
    return local, report


def _checkpoint_here(engine: Engine, entries: list[FileEntry], given: dict[str, Path],
                     sha256_of: Callable[[Path], Any]) -> tuple[Path, str] | str:
    """The checkpoint a group renders on and its SHA-256 (what jobs name it by); or why there is none here."""
    checkpoint = group_checkpoint(engine, entries, given)
    if isinstance(checkpoint, str):
        return checkpoint
    try:
        return checkpoint, digest_of(sha256_of(checkpoint))
    except OSError as exc:
        return f"checkpoint {checkpoint}: {exc.strerror or exc}"


class Loaded:
    """The one pipeline this worker holds: loaded when a job on another checkpoint comes, the old one let go."""

    def __init__(self, options: VerifyOptions, sha256_of: Callable[[Path], Any]) -> None:
        self.options, self.sha256_of = options, sha256_of
        self.checkpoint_sha256: str | None = None
        self.verifier: Verifier | None = None

    def on(self, checkpoint_sha256: str, checkpoint: Path) -> Verifier:
        """The verifier on that checkpoint; the checkpoint's load error as is."""
        if checkpoint_sha256 != self.checkpoint_sha256:
            self.checkpoint_sha256, self.verifier = None, None
            gc.collect()  # the old pipeline goes before the next is loaded
            self.verifier = Verifier(checkpoint, self.options, self.sha256_of, baseline_cache())
            self.checkpoint_sha256 = checkpoint_sha256
        assert self.verifier is not None
        return self.verifier


def run_worker(engine: Engine, options: VerifyOptions, out_dir: Path, sha256_of: Callable[[Path], Any],
               kind: str | None = None, base: str | None = None, unverified: bool = False,
               checkpoint_for: dict[str, Path] | None = None, checkpoints: bool = False,
               lease_s: float | None = None, progress_bar: bool = True) -> LibraryReport:
    """Queue the selection, then verify jobs from the queue until none is left that this worker could take; each
    result is recorded with its job, a grid per file goes to `out_dir`, and DIR/index.html shows every job
    finished with these settings so far (the last worker to stop writes the whole sheet). The report holds
    what this worker verified and the entries it did not queue."""
    sha256_of = cache(sha256_of)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_digest(options)
    local, report = queue_library(engine, settings, sha256_of, kind, base, unverified, checkpoints,
                                  checkpoint_for or {})
    loaded = Loaded(options, sha256_of)
    with Worker(engine, local, settings, lease_s or DEFAULT_LEASE_S) as worker, \
            tqdm(desc="verify", unit="file", disable=None if progress_bar else True) as bar:
        for jobs in worker.batches(BATCH, lambda: loaded.checkpoint_sha256):
            for number, job in enumerate(jobs):
                result = _verify_job(job, local, loaded, out_dir, sha256_of)
                if result is None:  # its checkpoint does not load here: leave its jobs to others
                    worker.checkpoints.discard(job.checkpoint_sha256)
                    worker.give_back(jobs[number:])
                    break
                if worker.finish(job, result):
                    report.results.append(result)
                bar.update(1)
    results = finished_results(engine, settings)
    passed = sum(r["verdict"] == "pass" for r in results)
    write_contact_sheet(out_dir, results, f"{len(results)} verified: {passed} pass, {len(results) - passed} fail")
    return report


def _verify_job(job: Job, local: dict[str, Path], loaded: Loaded, out_dir: Path,
                sha256_of: Callable[[Path], Any]) -> dict[str, Any] | None:
    """The job's result; None when its checkpoint cannot be used here (does not load, or is of another base)."""
    checkpoint = local[job.checkpoint_sha256]
    itself = job.kind == "checkpoint"
    start = time.monotonic()
    try:
        verifier = loaded.on(job.checkpoint_sha256, checkpoint)
    except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not stop the worker
        if itself:  # the checkpoint under test does not load: its own fail
            return failed_result(job, checkpoint, None, None, error_line(exc), start) | {"skipped": None}
        tqdm.write(f"warning: checkpoint {checkpoint}: {error_line(exc)}; its jobs are left to other workers",
                   file=sys.stderr)
        return None
    if not itself and verifier.base != job.base:
        tqdm.write(f"warning: {checkpoint.name} is an {verifier.base} checkpoint, not {job.base}; its jobs are "
                   "left to other workers", file=sys.stderr)
        return None
    return verify_entry(verifier, job, out_dir, sha256_of)
