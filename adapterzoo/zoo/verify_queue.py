"""The registry's verify queue, which `verify --registry --worker` processes on any number of machines share.

The database does the coordination. A worker takes queued jobs in one statement that picks them with SELECT
... FOR UPDATE SKIP LOCKED (on PostgreSQL two workers never wait for, nor take, the same job; SQLite, for
several processes on one machine, holds its write lock for the statement), holds a lease on them that a
heartbeat thread renews while the process lives, and records each result together with the job's `done` in
one transaction, only while the job is still its own: a job is done exactly once. A worker that dies stops
renewing; once its lease has passed, the next worker to look queues its jobs again, blaming the one it was
verifying (its lowest unfinished id, as a worker goes through its batch in id order); a file two workers died
on is recorded as a fail, not retried. Times come from the database's clock, so hosts whose clocks differ
agree on leases.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from functools import cache
from hashlib import sha256
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    DateTime,
    Engine,
    Integer,
    Interval,
    Update,
    bindparam,
    create_engine,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from adapterzoo import __version__
from adapterzoo.zoo.hosts import SHARED_HOST, current_host
from adapterzoo.zoo.models import FileEntry, Location, Verification, VerifyJob
from adapterzoo.zoo.verifications import verification_values

JOBS = VerifyJob.__table__
FILES = FileEntry.__table__
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
MAX_CRASHES = 2  # workers that may die on one file before it is recorded as a fail
RENEWALS_PER_LEASE = 3  # the heartbeat renews this often per lease, so one late renewal loses nothing
IDLE_POLL_S = 1.0  # a worker with nothing to take looks again this often while others still work
RATE_WINDOW = timedelta(minutes=5)  # `status` rate: jobs finished over the last this long
INSERT_CHUNK = 1000


@dataclass(frozen=True)
class Job:
    """A job a worker holds, with what verifying it needs of its file."""

    id: int
    file_id: int
    path: str | None  # where this host reads the file; None: no copy of it here
    kind: str
    base: str
    format: str | None
    checkpoint: str
    checkpoint_sha256: str


def paths_here(engine: Engine, file_ids: Collection[int], host: str) -> dict[int, str]:
    """file id -> where `host` reads it: a present location of its own or on a shared root it mounts, that is
    there now. Files without one are left out: workers on other hosts take them. One query on the locations
    (and their roots, for shared ones): a take pays for it on every job."""
    with Session(engine) as session:
        locations = session.scalars(select(Location).where(
            Location.file_id.in_(list(file_ids)), Location.missing.is_(False),
            Location.host.in_([host, SHARED_HOST])).order_by(Location.path)).all()
        found: dict[int, str] = {}
        for location in locations:
            if location.file_id not in found:
                local = location.local_path(host)
                if local is not None and os.path.exists(local):
                    found[location.file_id] = local
    return found


def job_digest(entry: FileEntry, checkpoint_sha256: str, settings: str) -> str:
    """What makes a job unique: the file (its id and content), the checkpoint's content and the settings."""
    content = entry.sha256 or f"{entry.size}:{entry.first_seen}"  # an unreadable folder has no digest
    return sha256(f"{entry.id}\0{content}\0{checkpoint_sha256}\0{settings}".encode()).hexdigest()


def _now(connection: Connection, plus: timedelta | None = None) -> ColumnElement[datetime]:
    """Now (plus a lease) as SQL on the database's clock, in UTC without a zone like every TIMESTAMP of the
    registry: hosts whose clocks differ agree on leases. SQLite lives on this machine: its clock is ours."""
    if connection.dialect.name == "postgresql":
        now = func.timezone("UTC", func.statement_timestamp(), type_=DateTime)
        return now + plus if plus else now
    return literal(datetime.now(timezone.utc).replace(tzinfo=None) + (plus or timedelta()), DateTime)


def _clock(connection: Connection) -> datetime:
    """Now, on the database's clock, as a value."""
    return connection.execute(select(_now(connection))).scalar_one()


@contextmanager
def _locked(engine: Engine) -> Iterator[Connection]:
    """A transaction that reads rows before it changes them. SQLite has no row locks: it takes the write lock
    first, so two workers never both act on what they read."""
    with engine.begin() as connection:
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield connection


def _lease_engine(engine: Engine) -> Engine:
    """Where a worker takes and renews leases: each one statement in autocommit, and on PostgreSQL committed
    without waiting for the disk (synchronous_commit off). A lease the server loses in a crash only puts its job
    back in the queue, and a result counts only while the job is its worker's, so nothing is done twice.
    Results themselves are committed durably, on `engine`."""
    if engine.dialect.name == "postgresql":
        return create_engine(engine.url, isolation_level="AUTOCOMMIT",
                             connect_args={"options": "-c synchronous_commit=off"})
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@cache
def _claim_statement(dialect: str) -> Update:
    """UPDATE the first queued jobs (chosen by SELECT ... FOR UPDATE SKIP LOCKED, so rows another worker is
    taking are skipped; SQLite holds its write lock for the statement) to running, leased to a worker; with what
    verifying them needs. Built once: a take runs it with its parameters (`_time_parameters` for the clock)."""
    chosen = (select(JOBS.c.id).where(JOBS.c.state == QUEUED,
                                      JOBS.c.checkpoint_sha256.in_(bindparam("shas", expanding=True)),
                                      JOBS.c.settings == bindparam("my_settings"),
                                      JOBS.c.id.not_in(bindparam("unreadable", expanding=True)))
              .order_by(JOBS.c.id).limit(bindparam("count", type_=Integer)).with_for_update(skip_locked=True)
              .cte("chosen").prefix_with("MATERIALIZED", dialect="postgresql"))  # run once, never re-planned
    file = FILES.alias("f")
    of_file = [select(file.c[name]).where(file.c.id == JOBS.c.file_id).scalar_subquery().label(name)
               for name in ("kind", "base", "format")]
    if dialect == "postgresql":
        now = func.timezone("UTC", func.statement_timestamp(), type_=DateTime)
        lease_until = now + bindparam("lease", type_=Interval)
    else:
        now, lease_until = bindparam("now", type_=DateTime), bindparam("now_plus_lease", type_=DateTime)
    return (update(JOBS).where(JOBS.c.id == chosen.c.id)
            .values(state=RUNNING, worker=bindparam("my_name"), host=bindparam("my_host"), lease_until=lease_until,
                    started=now)
            .returning(JOBS.c.id, JOBS.c.file_id, *of_file, JOBS.c.checkpoint, JOBS.c.checkpoint_sha256))


def _time_parameters(connection: Connection, lease: timedelta) -> dict[str, Any]:
    """The clock's parameters of `_claim_statement`: PostgreSQL reads its own clock and needs the lease."""
    if connection.dialect.name == "postgresql":
        return {"lease": lease}
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return {"now": now, "now_plus_lease": now + lease}


def enqueue(engine: Engine, jobs: Iterable[tuple[FileEntry, Path, str]], settings: str) -> int:
    """Queue each (file, checkpoint path, checkpoint SHA-256) with these settings unless it was queued before;
    returns how many are new. Every worker started with the same flags calls this: the digest's unique index
    keeps each job once (rows go in digest order, so two workers adding the same jobs never deadlock)."""
    rows = sorted(({"digest": job_digest(entry, checkpoint_sha256, settings), "file_id": entry.id,
                    "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256, "settings": settings,
                    "state": QUEUED, "crashes": 0} for entry, checkpoint, checkpoint_sha256 in jobs),
                  key=lambda row: row["digest"])
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    added = 0
    with engine.begin() as connection:
        now = _clock(connection)
        statement = dialect.insert(JOBS).on_conflict_do_nothing(index_elements=["digest"]).returning(JOBS.c.id)
        for start in range(0, len(rows), INSERT_CHUNK):
            chunk = [{**row, "queued": now} for row in rows[start:start + INSERT_CHUNK]]
            added += len(connection.execute(statement, chunk).all())
    return added


class Worker:
    """This process's side of the queue: takes jobs on the checkpoints it has, renews its lease while it lives,
    finishes or gives back what it took. Use it as a context manager: the heartbeat runs inside, and leaving
    gives back whatever it still holds (Ctrl-C puts its jobs back at once)."""

    def __init__(self, engine: Engine, checkpoints: Collection[str], settings: str, lease_s: float) -> None:
        self.engine = engine
        self.checkpoints = set(checkpoints)  # SHA-256 of each checkpoint this worker can render on
        self.settings = settings
        self.lease = timedelta(seconds=lease_s)
        self.host = current_host()
        self.name = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.unreadable: set[int] = set()  # jobs whose file this machine cannot read: left to other workers
        self._leases = _lease_engine(engine)
        self._held: set[int] = set()  # what the heartbeat renews
        self._held_lock = threading.Lock()
        self._reap_at = 0.0  # when to look for dead workers' jobs next (time.monotonic)
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._renew, name="verify-lease", daemon=True)

    def __enter__(self) -> Worker:
        self._heartbeat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._heartbeat.join()
        self.give_back()
        if self._leases is not self.engine:
            self._leases.dispose()

    def _mine(self) -> list[Any]:
        """The jobs this worker could take, as conditions."""
        return [JOBS.c.settings == self.settings, JOBS.c.checkpoint_sha256.in_(self.checkpoints),
                JOBS.c.id.not_in(self.unreadable)]

    def take(self, count: int, prefer: str | None = None) -> list[Job]:
        """Up to `count` queued jobs, now leased to this worker, in id order, those on checkpoint `prefer` first
        (its pipeline is loaded); [] when nothing is queued that it can take. First, a few times per lease, it
        takes back the jobs of dead workers."""
        if time.monotonic() >= self._reap_at:
            try:
                with _locked(self.engine) as connection:
                    _take_back_expired(connection)
            except OperationalError:  # a deadlock with a late worker giving its jobs back: the next look retries
                pass
            self._reap_at = time.monotonic() + self.lease.total_seconds() / RENEWALS_PER_LEASE
        groups = [[prefer], sorted(self.checkpoints - {prefer})] if prefer in self.checkpoints \
            else [sorted(self.checkpoints)]
        taken: list[Job] = []
        with self._leases.connect() as connection:
            for shas in groups:
                while shas and len(taken) < count:
                    claimed = self._claim(connection, shas, count - len(taken))
                    if not claimed:
                        break
                    here = paths_here(self.engine, {job.file_id for job in claimed}, self.host)
                    claimed = [replace(job, path=here.get(job.file_id)) for job in claimed]
                    unreadable = [job for job in claimed if job.path is None]
                    if unreadable:  # leave them to workers that can read them
                        self.unreadable.update(job.id for job in unreadable)
                        self.give_back(unreadable)
                    taken += [job for job in claimed if job not in unreadable]
        self._hold(job.id for job in taken)
        return taken

    def _claim(self, connection: Connection, shas: list[str], count: int) -> list[Job]:
        """Lease up to `count` queued jobs on checkpoints `shas` to this worker, in one statement."""
        rows = connection.execute(_claim_statement(connection.dialect.name), {
            "shas": shas, "my_settings": self.settings, "unreadable": list(self.unreadable), "count": count,
            "my_name": self.name, "my_host": self.host, **_time_parameters(connection, self.lease)}).all()
        return sorted((Job(path=None, **row._mapping) for row in rows), key=lambda job: job.id)

    def _hold(self, ids: Iterable[int], held: bool = True) -> None:
        with self._held_lock:
            (self._held.update if held else self._held.difference_update)(ids)

    def batches(self, size: int, prefer: Callable[[], str | None] = lambda: None) -> Iterator[list[Job]]:
        """Batches of up to `size` jobs taken for this worker (`prefer()` names the checkpoint it would rather
        have), until nothing is left that it could take. Meanwhile it waits out the lease of other workers'
        running jobs: if one of them died, its jobs are this worker's to finish."""
        while True:
            jobs = self.take(size, prefer())
            if jobs:
                yield jobs
                continue
            wait = self.next_chance_s()
            if wait is None:
                return
            time.sleep(wait)
            self._reap_at = 0.0  # a lease may have run out meanwhile

    def finish(self, job: Job, result: dict[str, Any]) -> bool:
        """Record `result` (a `verify --json` object) and mark the job done, if it is still this worker's; False
        when its lease ran out and another worker took it (that worker's result is the one that counts)."""
        self._hold([job.id], held=False)
        with self.engine.connect() as connection:
            verification = connection.execute(insert(Verification).values(verification_values(job.file_id, result))
                                              .returning(Verification.id)).scalar_one()
            done = connection.execute(update(JOBS).where(
                JOBS.c.id == job.id, JOBS.c.worker == self.name, JOBS.c.state == RUNNING).values(
                state=DONE, verification_id=verification, lease_until=None, finished=_now(connection))).rowcount
            if done != 1:
                connection.rollback()
                return False
            connection.commit()
            return True

    def give_back(self, jobs: Iterable[Job] | None = None) -> None:
        """Queue again this worker's running jobs (or just `jobs`), as if never taken: no crash is counted."""
        condition = [JOBS.c.worker == self.name, JOBS.c.state == RUNNING]
        if jobs is not None:
            ids = [job.id for job in jobs]
            condition.append(JOBS.c.id.in_(ids))
        with self._held_lock:
            self._held.difference_update(self._held if jobs is None else ids)
        with self.engine.begin() as connection:
            connection.execute(update(JOBS).where(*condition).values(
                state=QUEUED, worker=None, host=None, lease_until=None, started=None))

    def next_chance_s(self) -> float | None:
        """After `take` found nothing: None when nothing is left that this worker could ever take, else how long
        to wait before looking again: until the earliest lease of another worker's job runs out, at most
        IDLE_POLL_S (those jobs may finish, or new ones be queued, meanwhile)."""
        with self.engine.connect() as connection:
            now = _clock(connection)
            states = dict(connection.execute(
                select(JOBS.c.state, func.min(JOBS.c.lease_until)).where(
                    JOBS.c.state.in_([QUEUED, RUNNING]), *self._mine()).group_by(JOBS.c.state)).all())
        if QUEUED in states:
            return 0.0
        if RUNNING not in states:
            return None
        until_expiry = (states[RUNNING] - now).total_seconds() if states[RUNNING] else 0.0
        return min(max(until_expiry, 0.0) + 0.05, IDLE_POLL_S)

    def _renew(self) -> None:
        """The heartbeat: a few times per lease, extend the lease of every job this worker holds."""
        while not self._stop.wait(self.lease.total_seconds() / RENEWALS_PER_LEASE):
            with self._held_lock:
                held = list(self._held)
            if not held:
                continue
            try:
                with self._leases.connect() as connection:
                    connection.execute(update(JOBS).where(
                        JOBS.c.id.in_(held), JOBS.c.worker == self.name, JOBS.c.state == RUNNING)
                        .values(lease_until=_now(connection, self.lease)))
            except SQLAlchemyError:
                pass  # the database is away: if the lease runs out, finish() finds the job taken and says so


def _take_back_expired(connection: Connection) -> None:
    """Queue again the jobs of workers whose lease has passed (they died), in a `_locked` transaction. Rows are
    locked and waited for, so two workers never blame one death twice. Each dead worker's lowest job was the
    one it was verifying: that file's crash count goes up, and at MAX_CRASHES it is recorded as a fail."""
    rows = connection.execute(
        select(JOBS.c.id, JOBS.c.file_id, JOBS.c.worker, JOBS.c.host, JOBS.c.crashes, JOBS.c.checkpoint,
               JOBS.c.checkpoint_sha256).where(JOBS.c.state == RUNNING, JOBS.c.lease_until < _now(connection))
        .order_by(JOBS.c.id).with_for_update()).all()
    blamed = {}
    for row in rows:
        blamed.setdefault(row.worker, row.id)
    for row in rows:
        crashes = row.crashes + (blamed[row.worker] == row.id)
        if crashes < MAX_CRASHES:
            connection.execute(update(JOBS).where(JOBS.c.id == row.id).values(
                state=QUEUED, worker=None, host=None, lease_until=None, started=None, crashes=crashes))
            continue
        reason = f"a verify worker died on this file {crashes} times (last on {row.host}): not retried"
        result = {"checkpoint": row.checkpoint, "checkpoint_sha256": row.checkpoint_sha256, "verdict": "fail",
                  "reasons": [reason], "coverage": None, "effects": [], "grid": None, "parameters": {},
                  "seconds": None, "version": __version__}
        verification = connection.execute(insert(Verification).values(verification_values(row.file_id, result))
                                          .returning(Verification.id)).scalar_one()
        connection.execute(update(JOBS).where(JOBS.c.id == row.id).values(
            state=FAILED, lease_until=None, crashes=crashes, verification_id=verification,
            finished=_now(connection)))


def queue_status(engine: Engine) -> dict[str, Any]:
    """The queue in numbers: queued, running by host (and how many of those lost their worker), done (by
    verdict), failed (a worker died on them twice), jobs finished per minute lately and the time left at that
    rate."""
    with engine.connect() as connection:
        now = _clock(connection)
        by_state = connection.execute(
            select(JOBS.c.state, JOBS.c.host, func.count(), func.count().filter(JOBS.c.lease_until < now))
            .group_by(JOBS.c.state, JOBS.c.host)).all()
        verdicts = dict(connection.execute(
            select(Verification.verdict, func.count()).join(JOBS, JOBS.c.verification_id == Verification.id)
            .where(JOBS.c.state == DONE).group_by(Verification.verdict)).all())
        recent, first = connection.execute(select(func.count(), func.min(JOBS.c.started)).where(
            JOBS.c.finished >= now - RATE_WINDOW)).one()
    count = {state: sum(n for s, _, n, _ in by_state if s == state) for state in (QUEUED, RUNNING, DONE, FAILED)}
    window = min(RATE_WINDOW, now - first).total_seconds() if first else 0.0
    rate = recent / window * 60 if recent and window > 0 else None
    left = count[QUEUED] + count[RUNNING]
    return {
        "queued": count[QUEUED],
        "running": count[RUNNING],
        "running_by_host": {host: n for state, host, n, _ in by_state if state == RUNNING},
        "lease_ended": sum(stale for state, _, _, stale in by_state if state == RUNNING),
        "done": count[DONE],
        "pass": verdicts.get("pass", 0),
        "fail": verdicts.get("fail", 0),
        "failed": count[FAILED],
        "per_minute": None if rate is None else round(rate, 1),
        "seconds_left": None if rate is None or not left else round(left / rate * 60),
    }


def finished_results(engine: Engine, settings: str) -> list[dict[str, Any]]:
    """Every job finished with these settings, by path, as the objects `verify --json` prints (what a contact
    sheet shows)."""
    statement = (select(FileEntry, Verification).join(JOBS, JOBS.c.file_id == FileEntry.id)
                 .join(Verification, Verification.id == JOBS.c.verification_id)
                 .where(JOBS.c.settings == settings, JOBS.c.state.in_([DONE, FAILED])).order_by(FileEntry.path))
    with Session(engine) as session:
        return [{"file": entry.path, "sha256": entry.sha256, "kind": entry.kind, "base": entry.base,
                 "format": entry.format, **verification.to_json(), "skipped": None}
                for entry, verification in session.execute(statement)]
