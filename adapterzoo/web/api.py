"""The JSON API under /api/: the CLI's --json shapes (adapterzoo/views.py builds both), jobs and their events.

Duplicates, updates and disk use are `dupes`, `updates` and `du`; updates ask Civitai (web/care.py keeps the
last check for the pages).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.probe_result import KINDS
from adapterzoo.formats.model.registry import bases
from adapterzoo.views import disk_use_rows, dupe_groups, file_detail, file_rows
from adapterzoo.web.actions import JobRequest, work_for
from adapterzoo.web.jobs import FINISHED
from adapterzoo.zoo.queries import PROVIDERS, SORTS, STATUSES, VERDICTS, FileFilter, entry_by_id, page_entries

router = APIRouter(prefix="/api", tags=["api"])
PER_PAGE = 48
BASE_WORDS = (*bases(), "unknown")  # every base probe may have said
MAX_PER_PAGE = 500
EVENT_POLL_S = 0.1
KEEPALIVE_S = 15.0


def json_answer(body: Any, headers: dict[str, str] | None = None) -> Response:
    """JSON as the CLI prints it (json.dumps), without FastAPI's slower generic encoder."""
    return Response(json.dumps(body, default=str, ensure_ascii=False), media_type="application/json",
                    headers=headers)


def zoo(request: Request) -> Any:
    return request.app.state.zoo


def entry_or_404(request: Request, file_id: int) -> Any:
    """The registry entry `file_id`, or a 404 naming it."""
    entry = entry_by_id(zoo(request).engine, file_id)
    if entry is None:
        raise HTTPException(404, f"no registry entry {file_id}")
    return entry


def file_filter(kind: str | None, base: str | None, verdict: str | None, status: str | None, source: str | None,
                root: str | None, q: str | None) -> FileFilter:
    """The filter the query string asks for; a value outside the vocabulary is a 400 naming it."""
    for name, value, allowed in (("kind", kind, KINDS), ("base", base, BASE_WORDS), ("verdict", verdict, VERDICTS),
                                 ("status", status, STATUSES), ("source", source, PROVIDERS)):
        if value and value not in allowed:
            raise HTTPException(400, f"{name} is one of {', '.join(allowed)}, not {value!r}")
    return FileFilter(kind or None, base or None, (q or "").strip() or None, verdict or None, status or None,
                      source or None, root or None)


@router.get("/files", summary="list --json, filtered, sorted and paged",
            description="The rows of `adapterzoo list --json`. The total is in X-Total-Count; the next page in "
                        "a Link header (rel=next).")
def files(request: Request, kind: str | None = None, base: str | None = None,
          verdict: str | None = None, status: str | None = None, source: str | None = None,
          root: str | None = None, q: str | None = None, sort: str = "name", page: int = Query(1, ge=1),
          per_page: int = Query(PER_PAGE, ge=1, le=MAX_PER_PAGE)) -> Response:
    if sort not in SORTS:
        raise HTTPException(400, f"sort is one of {', '.join(SORTS)}, not {sort!r}")
    chosen = file_filter(kind, base, verdict, status, source, root, q)
    entries, total = page_entries(zoo(request).engine, chosen, sort, page, per_page)
    headers = {"X-Total-Count": str(total)}
    if page * per_page < total:
        headers["Link"] = f'<{request.url.include_query_params(page=page + 1)}>; rel="next"'
    return json_answer(file_rows(zoo(request).engine, entries), headers)


@router.get("/files/{file_id}", summary="show --json")
def file(request: Request, file_id: int) -> dict[str, Any]:
    return file_detail(zoo(request).engine, entry_or_404(request, file_id))


@router.get("/files/{file_id}/blocks", summary="per-block ‖ΔW‖_F of a LoRA (the file page's heat map)")
def blocks(request: Request, file_id: int) -> list[dict[str, Any]]:
    from adapterzoo.web.heatmap import blocks_of

    return blocks_of(entry_or_404(request, file_id))


@router.post("/files/{file_id}/trash", summary="move the file and its sidecars to the platform trash")
def trash(request: Request, file_id: int) -> dict[str, Any]:
    """`adapterzoo rm ID`: every copy on this host with its sidecars; the registry records each in its history."""
    from adapterzoo.zoo.trash import trash as to_trash

    entry = entry_or_404(request, file_id)
    return {"trashed": [t.to_json() for t in to_trash(zoo(request).engine, [str(entry.id)])]}


@router.post("/files/{file_id}/reveal", summary="show the file in the system's file manager")
def reveal(request: Request, file_id: int) -> dict[str, Any]:
    from adapterzoo.web.reveal import reveal_path

    entry = entry_or_404(request, file_id)
    return {"path": entry.path, "opened": reveal_path(entry.path)}


@router.get("/dupes", summary="dupes --json: groups of copies that are one file, and the bytes a dedupe frees")
def dupes(request: Request, by: str = "sha256") -> Response:
    from adapterzoo.zoo.dupes import BY

    if by not in BY:
        raise HTTPException(400, f"by is one of {', '.join(BY)}, not {by!r}")
    return json_answer(dupe_groups(zoo(request).engine, by))


@router.get("/updates", summary="updates --json: newer Civitai versions of the models you hold",
            description="Asks Civitai (one request per 100 models). The last default check is kept for the "
                        "Updates page and the library's has-update filter.")
def updates(request: Request, same_base: bool = False, include_early_access: bool = False) -> Response:
    state = zoo(request)
    try:
        return json_answer(state.updates.check(state.engine, same_base, include_early_access))
    except AdapterzooError as exc:
        raise HTTPException(502, str(exc)) from None


@router.get("/du", summary="du --json: bytes on disk, files and copies by kind, base, root or source")
def disk_use(request: Request, by: str = "kind") -> Response:
    from adapterzoo.zoo.dupes import DU_BY

    if by not in DU_BY:
        raise HTTPException(400, f"by is one of {', '.join(DU_BY)}, not {by!r}")
    return json_answer(disk_use_rows(zoo(request).engine, by))


@router.get("/search", summary="search --json: Civitai and the Hub")
def search(request: Request, q: str = Query(..., min_length=1), source: str = "all", kind: str | None = None,
           base: str | None = None, sort: str = "downloads", limit: int = Query(20, ge=1, le=100),
           nsfw: bool = False) -> list[dict[str, Any]]:
    from adapterzoo.zoo.search import SOURCES
    from adapterzoo.zoo.search import search as run_search

    if source not in SOURCES:
        raise HTTPException(400, f"source is one of {', '.join(SOURCES)}, not {source!r}")
    return [hit.json for hit in run_search(zoo(request).engine, q, source, kind or None, base or None, sort, limit,
                                           nsfw)]


@router.get("/session", summary="the CSRF token for this session's POST requests (X-CSRF-Token)")
def session(request: Request) -> dict[str, str]:
    return {"csrf": request.scope["state"]["csrf"]}


@router.post("/jobs", status_code=201, summary="start pull | scan | verify | enrich")
def start_job(request: Request, body: JobRequest) -> dict[str, Any]:
    state = zoo(request)
    try:
        work = work_for(body, state.context)
    except AdapterzooError as exc:
        raise HTTPException(400, str(exc)) from None
    return state.jobs.start(body.action, body.model_dump(exclude_defaults=True), work).to_json()


@router.get("/jobs", summary="every job of this server, newest first")
def jobs(request: Request) -> list[dict[str, Any]]:
    return [job.to_json() for job in zoo(request).jobs.all()]


@router.get("/jobs/{job_id}", summary="one job: state, progress, each file's result")
def job(request: Request, job_id: int) -> dict[str, Any]:
    return _job(request, job_id).to_json()


@router.post("/jobs/{job_id}/cancel", summary="stop a job at its next progress report")
def cancel(request: Request, job_id: int) -> dict[str, Any]:
    found = _job(request, job_id)
    found.cancel()
    return found.to_json()


@router.get("/jobs/{job_id}/events", summary="Server-Sent Events: state, progress, result",
            description="`event: state|progress|result`, `data:` one JSON object, `id:` its number (send "
                        "Last-Event-ID to resume). The stream ends after the job's final state.")
async def events(request: Request, job_id: int) -> StreamingResponse:
    found = _job(request, job_id)
    start = request.headers.get("last-event-id", "0")
    seen = int(start) if start.isdigit() else 0

    async def stream() -> AsyncIterator[str]:
        nonlocal seen
        quiet = 0.0
        while True:
            fresh = found.events_after(seen)
            for event in fresh:
                seen = event["seq"]
                yield f"id: {seen}\nevent: {event['type']}\ndata: {json.dumps(event['data'], default=str)}\n\n"
            if found.state in FINISHED and not found.events_after(seen):
                return
            if await request.is_disconnected():
                return
            quiet = 0.0 if fresh else quiet + EVENT_POLL_S
            if quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(EVENT_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _job(request: Request, job_id: int) -> Any:
    found = zoo(request).jobs.get(job_id)
    if found is None:
        raise HTTPException(404, f"no job {job_id}")
    return found
