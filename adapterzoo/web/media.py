"""Images by registry id, never by path: a file's preview, a verification's grid, thumbnails of them, the
heat map, and thumbnails of search results' images (only URLs our own search named).

A path read from the registry is still checked before a byte is served: a preview must resolve inside the
file's own folder (or the adapterzoo home, where pull keeps the source's preview), a grid must not be a
link, and either must be a real image (Pillow reads its header). Thumbnails live under content-hash names
and are served with an ETag and a year's cache lifetime.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse, RedirectResponse

from adapterzoo.errors import AdapterzooError
from adapterzoo.web.api import entry_or_404
from adapterzoo.web.heatmap import blocks_of, layout
from adapterzoo.zoo.db import home_folder
from adapterzoo.zoo.home_cache import KEY, cache_path
from adapterzoo.zoo.models import FileEntry
from adapterzoo.zoo.queries import latest_verifications, sources_of, verification_by_id
from adapterzoo.zoo.thumbnails import image_type, thumbnail

router = APIRouter(prefix="/media", include_in_schema=False)
FOREVER = "public, max-age=31536000, immutable"
SHORT = "private, max-age=60"


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def preview_of(request: Request, entry: FileEntry) -> Path | None:
    """The file's own preview (beside it), else its source's (kept in the home folder); only if it is real."""
    home = home_folder()  # where pull and enrich keep sources' previews
    candidates = [(entry.preview_path, Path(entry.path).parent)]
    candidates += [(s.preview_path, home) for s in sources_of(request.app.state.zoo.engine, entry.id)]
    for found, allowed in candidates:
        if found and Path(found).is_file() and _inside(Path(found), allowed):
            return Path(found)
    return None


def grid_path(grid: str | None) -> Path | None:
    """A verification's grid: a plain .png file (not a link to somewhere else)."""
    if not grid:
        return None
    path = Path(grid)
    return path if path.suffix.lower() == ".png" and path.is_file() and not path.is_symlink() else None


def card_image(request: Request, entry: FileEntry) -> Path | None:
    """What a card shows: the preview, else the latest verify grid."""
    found = preview_of(request, entry)
    if found is None:
        latest = latest_verifications(request.app.state.zoo.engine, entry.id).get(entry.id)
        found = grid_path(latest.grid_path if latest else None)
    return found


def _image(path: Path | None) -> Response:
    if path is None:
        raise HTTPException(404, "no image")
    try:
        media_type = image_type(path)
    except AdapterzooError as exc:
        raise HTTPException(404, str(exc)) from None
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": SHORT})


def _thumb_redirect(path: Path | None) -> Response:
    if path is None:
        raise HTTPException(404, "no image")
    try:
        _, digest = thumbnail(path)
    except AdapterzooError as exc:
        raise HTTPException(404, str(exc)) from None
    return RedirectResponse(f"/media/thumbs/{digest}.webp", status_code=302, headers={"Cache-Control": SHORT})


@router.get("/files/{file_id}/card")
def card(request: Request, file_id: int) -> Response:
    """The card's thumbnail; the kind's icon when the image the registry names is gone or is no image."""
    entry = entry_or_404(request, file_id)
    try:
        return _thumb_redirect(card_image(request, entry))
    except HTTPException:
        return RedirectResponse(f"/static/kinds/{entry.kind}.svg", status_code=302, headers={"Cache-Control": SHORT})


@router.get("/files/{file_id}/preview")
def preview(request: Request, file_id: int) -> Response:
    return _image(preview_of(request, entry_or_404(request, file_id)))


@router.get("/verifications/{verification_id}/grid")
def grid(request: Request, verification_id: int) -> Response:
    found = verification_by_id(request.app.state.zoo.engine, verification_id)
    return _image(grid_path(found.grid_path) if found else None)


@router.get("/verifications/{verification_id}/thumb")
def grid_thumb(request: Request, verification_id: int) -> Response:
    found = verification_by_id(request.app.state.zoo.engine, verification_id)
    return _thumb_redirect(grid_path(found.grid_path) if found else None)


@router.get("/thumbs/{name}")
def thumb(request: Request, name: str) -> Response:
    digest = name.removesuffix(".webp")
    if not KEY.fullmatch(digest) or not name.endswith(".webp"):
        raise HTTPException(404, "no such thumbnail")
    path = cache_path("thumbs", digest, ".webp")
    if not path.is_file():
        raise HTTPException(404, "no such thumbnail")
    tag = f'"{digest}"'
    headers = {"ETag": tag, "Cache-Control": FOREVER}
    if request.headers.get("if-none-match") == tag:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type="image/webp", headers=headers)


@router.get("/search/{key}")
def search_image(request: Request, key: str) -> Response:
    """A search result's image, fetched once from its source, kept and served as a thumbnail."""
    url = request.app.state.zoo.search_images.get(key)
    if url is None:
        raise HTTPException(404, "no such search image")
    kept = cache_path("remote", hashlib.sha256(url.encode()).hexdigest(), ".img")
    if not kept.is_file():
        from adapterzoo.formats.io.atomic import atomic_output
        from adapterzoo.zoo.civitai import CivitaiClient

        try:
            data = CivitaiClient().fetch_image(url)
        except AdapterzooError as exc:
            raise HTTPException(502, str(exc)) from None
        with atomic_output(kept) as tmp:
            tmp.write_bytes(data)
    return _thumb_redirect(kept)


@router.get("/files/{file_id}/blocks.svg")
def heat_map(request: Request, file_id: int) -> Response:
    entry = entry_or_404(request, file_id)
    try:
        blocks = blocks_of(entry)
    except AdapterzooError as exc:
        raise HTTPException(404, f"no heat map: {exc}") from None
    if not blocks:
        raise HTTPException(404, "no heat map for this file")
    drawing: dict[str, Any] = layout(blocks)
    page = request.app.state.zoo.templates.get_template("heatmap.svg").render(**drawing)
    return Response(page, media_type="image/svg+xml", headers={"Cache-Control": SHORT,
                                                                 "ETag": f'"{entry.sha256}"'})
