"""Long work started from the page (pull, scan, verify, enrich): each job runs in a thread of the server
process, keeps the events it emitted (progress, each file's result, its state) for the Jobs page and its
Server-Sent Events stream, and stops at its next progress report when cancelled."""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from adapterzoo.errors import AdapterzooError, Cancelled

FINISHED = ("done", "failed", "cancelled")
KEPT_JOBS = 200  # finished jobs beyond this many are forgotten, oldest first


@dataclass
class Job:
    id: int
    action: str
    params: dict[str, Any]
    state: str = "running"  # running | done | failed | cancelled
    error: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    finished: str | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Record an event: `progress` replaces the last progress, `result` adds a file's result."""
        with self._lock:
            if kind == "progress":
                self.progress = data
            elif kind == "result":
                self.results.append(data)
            self.events.append({"seq": len(self.events) + 1, "type": kind, "data": data})

    def finish(self, state: str, error: str | None) -> None:
        """The final state and its event, together: a reader never sees one without the other."""
        with self._lock:
            self.state, self.error = state, error
            self.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self.events.append({"seq": len(self.events) + 1, "type": "state", "data": {"state": state, "error": error}})

    def check(self) -> None:
        """Called from progress reports: raise Cancelled once cancel() was asked for."""
        if self._cancel.is_set():
            raise Cancelled()

    def cancel(self) -> bool:
        """Ask the job to stop at its next progress report; False when it has already finished."""
        if self.state in FINISHED:
            return False
        self._cancel.set()
        return True

    def events_after(self, seq: int) -> list[dict[str, Any]]:
        with self._lock:
            return self.events[seq:]

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"id": self.id, "action": self.action, "params": self.params, "state": self.state,
                    "error": self.error, "progress": self.progress, "results": list(self.results),
                    "created": self.created, "finished": self.finished}


class Jobs:
    """The server's jobs, newest first; one thread each."""

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, action: str, params: dict[str, Any], work: Callable[[Job], None]) -> Job:
        with self._lock:
            job = Job(next(self._ids), action, params)
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.state in FINISHED]
            for old in finished[:max(0, len(finished) - KEPT_JOBS)]:
                del self._jobs[old.id]
        job.emit("state", {"state": "running"})
        threading.Thread(target=self._run, args=(job, work), name=f"job-{job.id}-{action}", daemon=True).start()
        return job

    def _run(self, job: Job, work: Callable[[Job], None]) -> None:
        try:
            work(job)
            job.finish("done", None)
        except Cancelled:
            job.finish("cancelled", None)
        except AdapterzooError as exc:
            job.finish("failed", str(exc))
        except OSError as exc:
            job.finish("failed", f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
        except Exception as exc:  # noqa: BLE001 - a job's crash is its failure, shown on the page; the server goes on
            traceback.print_exc()
            job.finish("failed", f"{type(exc).__name__}: {exc}")

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: -j.id)


class Rate:
    """Bytes per second and seconds left, smoothed over the last few reports; at most 5 reports a second."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.first_bytes: int | None = None

    def due(self, done: bool) -> bool:
        now = time.monotonic()
        if done or now - self.last >= 0.2:
            self.last = now
            return True
        return False

    def measure(self, done_bytes: int, total: int | None) -> dict[str, Any]:
        if self.first_bytes is None:
            self.first_bytes = done_bytes  # a resumed download's bytes already there are not speed
        elapsed = max(time.monotonic() - self.start, 1e-6)
        rate = (done_bytes - self.first_bytes) / elapsed
        left = (total - done_bytes) / rate if total and rate > 0 else None
        return {"bytes": done_bytes, "total": total, "rate": round(rate), "eta": None if left is None else round(left, 1)}
