"""What each job action does: the same room functions the CLI's pull, scan, verify and enrich call, with
progress reported to the job. Nothing is decided here that the command line does not decide too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import Engine

from adapterzoo.errors import AdapterzooError
from adapterzoo.web.jobs import Job, Rate

ACTIONS = ("pull", "scan", "verify", "enrich")


class JobRequest(BaseModel):
    """POST /api/jobs: the action and its arguments (the CLI's, by the same names)."""

    action: Literal["pull", "scan", "verify", "enrich"]
    refs: list[str] = Field(default_factory=list, description="pull: civitai:VERSION, hf:OWNER/REPO/PATH, URL")
    library: str | None = Field(None, description="pull: an A1111/ComfyUI library folder (default: serve's)")
    layout: Literal["a1111", "comfyui"] | None = Field(None, description="pull: the library's layout")
    dest: str | None = Field(None, description="pull: a plain folder instead of a library")
    paths: list[str] = Field(default_factory=list, description="scan: folders or files to index")
    ids: list[int] = Field(default_factory=list, description="verify, enrich: registry ids")
    all: bool = Field(False, description="enrich: every file without a Civitai source")
    checkpoint: int | None = Field(None, description="verify: the registry id of the checkpoint to render on")
    steps: int | None = Field(None, ge=1, le=200, description="verify: sampling steps (default 20)")
    size: str | None = Field(None, pattern=r"^\d{2,5}x\d{2,5}$", description="verify: WxH")
    prompts: list[str] = Field(default_factory=list, description="verify: the grid's rows (default: a photo of a cat)")
    seeds: list[int] = Field(default_factory=list, description="verify: seeds (default 0)")
    multipliers: list[float] = Field(default_factory=list, description="verify: the grid's columns (default 0, 0.5, 1)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="verify: where to render")


class Context:
    """What the actions need from the server: the registry, its URL (for known hashes), where pulls go."""

    def __init__(self, engine: Engine, db_url: str, library: Path, layout: str, home: Path) -> None:
        self.engine, self.db_url, self.library, self.layout, self.home = engine, db_url, library, layout, home


def work_for(request: JobRequest, context: Context) -> Callable[[Job], None]:
    """The function a job thread runs; bad arguments fail here, before any job starts."""
    if request.action == "pull":
        if not request.refs:
            raise AdapterzooError("pull: say what to pull (refs)")
        return lambda job: _pull(job, request, context)
    if request.action == "scan":
        if not request.paths:
            raise AdapterzooError("scan: say which folders (paths)")
        missing = [p for p in request.paths if not Path(p).exists()]
        if missing:
            raise AdapterzooError(f"scan: no such folder or file: {missing[0]}")
        return lambda job: _scan(job, request, context)
    if request.action == "verify":
        if not request.ids or request.checkpoint is None:
            raise AdapterzooError("verify: give the files (ids) and the checkpoint's id (checkpoint)")
        return lambda job: _verify(job, request, context)
    if not request.ids and not request.all:
        raise AdapterzooError("enrich: give ids, or all: true for every file without a Civitai source")
    return lambda job: _enrich(job, request, context)


def _pull(job: Job, request: JobRequest, context: Context) -> None:
    from adapterzoo.zoo.pull import Target, pull

    library = None if request.dest else Path(request.library or context.library)
    target = Target(Path(request.dest or "."), library, request.layout or context.layout)
    for index, ref in enumerate(request.refs):
        rate = Rate()

        def progress(done: int, total: int | None, ref: str = ref, rate: Rate = rate, index: int = index) -> None:
            job.check()
            if rate.due(done == total):
                job.emit("progress", {"stage": "download", "ref": ref, "file": index + 1, "files": len(request.refs),
                                      **rate.measure(done, total)})

        job.check()
        job.emit("progress", {"stage": "resolve", "ref": ref, "file": index + 1, "files": len(request.refs)})
        (outcome,) = pull(context.engine, [ref], target, progress=progress)
        job.emit("result", outcome.to_json())


def _scan(job: Job, request: JobRequest, context: Context) -> None:
    from adapterzoo.zoo.scan import scan_paths

    def progress(done: int, total: int, path: str) -> None:
        job.check()
        job.emit("progress", {"stage": "scan", "done": done, "total": total, "path": path})

    report = scan_paths(request.paths, context.engine, progress=progress)
    job.emit("progress", {"stage": "scan", "done": report.indexed, "total": report.indexed, "path": None})
    job.emit("result", {**report.counts(), "problems": report.problems, "summary": report.summary()})


def _verify(job: Job, request: JobRequest, context: Context) -> None:
    from adapterzoo.verify.contact_sheet import grid_file
    from adapterzoo.verify.verifier import VerifyOptions, digest_of
    from adapterzoo.verify_library import verify_each
    from adapterzoo.zoo.known_hashes import provenance_sha256
    from adapterzoo.zoo.queries import entry_by_id

    checkpoint = entry_by_id(context.engine, request.checkpoint)
    if checkpoint is None or checkpoint.kind != "checkpoint":
        raise AdapterzooError(f"verify: registry entry {request.checkpoint} is not a checkpoint")
    entries = [entry_by_id(context.engine, i) for i in request.ids]
    if any(e is None for e in entries):
        raise AdapterzooError(f"verify: no registry entry {request.ids[entries.index(None)]}")
    size = tuple(int(n) for n in request.size.split("x")) if request.size else None
    options = VerifyOptions(prompts=request.prompts or None, size=size, device=request.device)
    options.seeds = request.seeds or options.seeds
    options.multipliers = request.multipliers or options.multipliers
    options.steps = request.steps or options.steps
    grids = context.home / "grids"
    grids.mkdir(parents=True, exist_ok=True)

    def sha256(path: Path) -> Any:
        return provenance_sha256(path, context.db_url)

    files = [Path(e.path) for e in entries]
    job.emit("progress", {"stage": "load", "done": 0, "total": len(files), "checkpoint": checkpoint.path})
    for done, result in enumerate(verify_each(context.engine, Path(checkpoint.path), files, options, sha256,
                                              lambda file: grid_file(grids, file, digest_of(sha256(file)))), 1):
        job.emit("result", {"id": entries[done - 1].id, **result})
        job.emit("progress", {"stage": "verify", "done": done, "total": len(files), "file": result["file"]})
        job.check()


def _enrich(job: Job, request: JobRequest, context: Context) -> None:
    from adapterzoo.zoo.enrich import enrich

    job.emit("progress", {"stage": "ask Civitai", "done": 0, "total": len(request.ids) or None})
    outcomes = enrich(context.engine, [str(i) for i in request.ids], every=request.all)
    for outcome in outcomes:
        job.emit("result", outcome.to_json())
    job.emit("progress", {"stage": "ask Civitai", "done": len(outcomes), "total": len(outcomes)})
