"""The HTML pages: Library, File, Search, Jobs, Duplicates, Updates, Disk use, and /docs.

Each reads through the same zoo queries and views.py rows as the API; the templates only arrange them.
Reading needs no JavaScript (filters are a GET form, paging is links); actions (pull, verify, trash, copy)
use the static app.js.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from adapterzoo.errors import AdapterzooError
from adapterzoo.formats.io.probe_result import KINDS
from adapterzoo.views import file_detail, file_row
from adapterzoo.views import disk_use_rows, dupe_groups
from adapterzoo.web.api import BASE_WORDS, PER_PAGE, file_filter
from adapterzoo.web.heatmap import mappable
from adapterzoo.zoo.hosts import current_host
from adapterzoo.zoo.queries import (
    PROVIDERS,
    SORTS,
    STATUSES,
    VERDICTS,
    counts_by_kind_and_base,
    entry_by_id,
    latest_verifications,
    list_entries,
    page_entries,
    sources_for,
)
from adapterzoo.zoo.roots import load_places

router = APIRouter(include_in_schema=False)
VIEWS = ("cards", "list")
UPDATE = "available"  # the has-update filter's one value: files of models the last update check found newer
FILTER_KEYS = ("q", "kind", "base", "verdict", "status", "source", "root", "update", "sort", "view")


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    zoo = request.app.state.zoo
    context.update(request=request, csrf=request.scope["state"]["csrf"], nav=template.removesuffix(".html"))
    return zoo.templates.TemplateResponse(request, template, context, status_code=status_code,
                                          headers={"Cache-Control": "no-store"})


def link(params: dict[str, Any], **changes: Any) -> str:
    """The library URL for `params` with `changes`: how every filter, sort and page link keeps the rest."""
    defaults = {"page": 1, "sort": "name", "view": "cards"}
    kept = {k: v for k, v in {**params, **changes}.items() if v not in (None, "") and defaults.get(k) != v}
    return "/?" + urlencode(kept) if kept else "/"


@router.get("/", response_class=HTMLResponse)
def library(request: Request, q: str | None = None, kind: str | None = None, base: str | None = None,
            verdict: str | None = None, status: str | None = None, source: str | None = None,
            root: str | None = None, update: str | None = None, sort: str = "name", view: str = "cards",
            page: int = Query(1, ge=1)) -> Response:
    if sort not in SORTS or view not in VIEWS or update not in (None, "", UPDATE):
        raise HTTPException(400, f"sort is one of {', '.join(SORTS)}, view one of {', '.join(VIEWS)}, update {UPDATE}")
    params = {"q": q, "kind": kind, "base": base, "verdict": verdict, "status": status, "source": source,
              "root": root, "update": update, "sort": sort, "view": view}
    canonical = link(params, page=page)
    if canonical != "/" and request.url.query and "/?" + request.url.query != canonical:
        return RedirectResponse(canonical, status_code=303)  # the filter form's empty fields, left out
    engine = request.app.state.zoo.engine
    updated = request.app.state.zoo.updates.file_ids()
    chosen = file_filter(kind, base, verdict, status, source, root, q)
    if update:
        chosen = replace(chosen, ids=updated or frozenset())
    entries, total = page_entries(engine, chosen, sort, page, PER_PAGE)
    ids = [e.id for e in entries]
    latest = latest_verifications(engine, file_ids=ids)
    sources = sources_for(engine, ids)
    cards = []
    for entry in entries:
        row = file_row(entry, latest.get(entry.id))
        named = next((s for s in sources[entry.id] if s.model_name), None)
        has_preview = entry.preview_path or any(s.preview_path for s in sources[entry.id])
        has_grid = entry.id in latest and latest[entry.id].grid_path
        cards.append({**row, "source_name": named.model_name if named else None,
                      "version_name": named.version_name if named else None,
                      "has_update": entry.id in (updated or ()),
                      "image": f"/media/files/{entry.id}/card" if has_preview or has_grid
                      else f"/static/kinds/{entry.kind}.svg",
                      "fit": "cover" if has_preview or not has_grid else "contain"})  # a grid is shown whole
    pages = max(1, math.ceil(total / PER_PAGE))
    kinds, bases = counts_by_kind_and_base(engine)
    return render(request, "library.html", cards=cards, total=total, page=page, pages=pages, params=params,
                  link=lambda **c: link(params, **c), kinds=kinds, bases=bases,
                  choices={"kind": KINDS, "base": BASE_WORDS, "verdict": VERDICTS, "status": STATUSES,
                           "source": PROVIDERS, "sort": SORTS, "update": (UPDATE,),
                           "root": [r.local for r in load_places(engine, current_host()).roots if r.local]},
                  checked=updated is not None,
                  filtered=any(params[k] for k in ("q", "kind", "base", "verdict", "status", "source", "root",
                                                   "update")))


@router.get("/files/{file_id}", response_class=HTMLResponse)
def file_page(request: Request, file_id: int) -> HTMLResponse:
    engine = request.app.state.zoo.engine
    entry = entry_by_id(engine, file_id)
    if entry is None:
        return render(request, "error.html", 404, message=f"No registry entry {file_id}.")
    detail = file_detail(engine, entry)
    checkpoints = [e for e in list_entries(engine, kind="checkpoint") if e.status == "ok"]
    same_base = [e for e in checkpoints if e.base == entry.base] + [e for e in checkpoints if e.base != entry.base]
    return render(request, "file.html", file=detail, checkpoints=same_base, heat_map=mappable(entry),
                  has_preview=bool(entry.preview_path or any(s["preview_path"] for s in detail["sources"])),
                  verifiable=entry.kind in ("lora", "lycoris", "hypernetwork", "embedding", "vae", "checkpoint")
                  and entry.status == "ok")


@router.get("/search", response_class=HTMLResponse)
def search_page(request: Request, q: str = "", source: str = "all", kind: str | None = None,
                base: str | None = None, nsfw: bool = False) -> HTMLResponse:
    from adapterzoo.zoo.search import SOURCES, search

    hits, error = [], None
    if source not in SOURCES:
        source = "all"
    if q.strip():
        try:
            hits = [hit.json for hit in search(request.app.state.zoo.engine, q.strip(), source, kind or None,
                                               base or None, "downloads", 24, nsfw)]
        except AdapterzooError as exc:
            error = str(exc)
    for hit in hits:
        if hit.get("image"):
            key = hashlib.sha256(hit["image"].encode()).hexdigest()[:32]
            request.app.state.zoo.remember_image(key, hit["image"])
            hit["thumb"] = f"/media/search/{key}"
        hit["refs"] = refs_of(hit)
    return render(request, "search.html", hits=hits, error=error, q=q, source=source, kind=kind, base=base,
                  nsfw=nsfw, kinds=[k for k in KINDS if k != "unknown"], bases=[b for b in BASE_WORDS if b != "unknown"],
                  library=str(request.app.state.zoo.context.library))


def refs_of(hit: dict[str, Any]) -> list[str | None]:
    """The pull REF of each file of a search hit: the version's primary file on Civitai, each file on the Hub."""
    if hit["source"] == "civitai":
        return [f"civitai:{hit['version_id']}" if i == 0 else None for i, _ in enumerate(hit["files"])]
    return [f"hf:{hit['model_id']}/{f['name']}@{hit['version_id']}" for f in hit["files"]]


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    return render(request, "jobs.html", jobs=[j.to_json() for j in request.app.state.zoo.jobs.all()])


@router.get("/dupes", response_class=HTMLResponse)
def dupes_page(request: Request, by: str = "sha256") -> HTMLResponse:
    from adapterzoo.zoo.dupes import BY

    if by not in BY:
        raise HTTPException(400, f"by is one of {', '.join(BY)}, not {by!r}")
    groups = dupe_groups(request.app.state.zoo.engine, by)
    return render(request, "dupes.html", groups=groups, by=by, choices=BY,
                  freed=sum(g["bytes_freed"] or 0 for g in groups))


@router.get("/updates", response_class=HTMLResponse)
def updates_page(request: Request, check: bool = False) -> HTMLResponse:
    """The last check, at once; Civitai is asked only on ?check=1 or when nothing was checked yet."""
    state = request.app.state.zoo
    error = None
    if check or state.updates.last is None:
        try:
            state.updates.check(state.engine)
        except AdapterzooError as exc:
            error = str(exc)
    last = state.updates.last
    return render(request, "updates.html", error=error, rows=last.rows if last else [],
                  checked=last.checked if last else None)


@router.get("/disk", response_class=HTMLResponse)
def disk_page(request: Request, by: str = "kind") -> HTMLResponse:
    from adapterzoo.zoo.dupes import DU_BY

    if by not in DU_BY:
        raise HTTPException(400, f"by is one of {', '.join(DU_BY)}, not {by!r}")
    rows = disk_use_rows(request.app.state.zoo.engine, by)
    return render(request, "disk.html", rows=rows, by=by, choices=DU_BY,
                  largest=max((r["bytes"] for r in rows), default=0), total=sum(r["bytes"] for r in rows))


@router.get("/docs", response_class=HTMLResponse)
def docs(request: Request) -> HTMLResponse:
    """The API described from its own OpenAPI document, rendered here (Swagger UI would load from a CDN)."""
    spec = request.app.openapi()
    routes = [{"path": path, "method": method.upper(), "summary": op.get("summary", ""),
               "description": op.get("description", ""),
               "parameters": op.get("parameters", []), "body": "requestBody" in op}
              for path, ops in spec["paths"].items() for method, op in ops.items()]
    job = spec.get("components", {}).get("schemas", {}).get("JobRequest", {})
    return render(request, "docs.html", routes=routes, job_fields=job.get("properties", {}))
