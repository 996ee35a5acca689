"""The FastAPI application behind `adapterzoo serve`: pages, the JSON API, images by registry id, jobs.

One process, the registry and home folder the CLI uses. Templates are rendered on the server (Jinja2,
autoescaped); the CSS and the few lines of JavaScript are static files of this package, so the page
works offline and needs no build step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterzoo import __version__
from adapterzoo.errors import AdapterzooError
from adapterzoo.web import api, media, pages
from adapterzoo.web.actions import Context
from adapterzoo.web.care import Updates
from adapterzoo.web.format import FILTERS
from adapterzoo.web.jobs import Jobs
from adapterzoo.web.security import Guard, SecurityMiddleware

HERE = Path(__file__).resolve().parent
SEARCH_IMAGES_KEPT = 2000


@dataclass
class Zoo:
    """What every route reads: the registry, the job runner, the checks' secrets, the page templates."""

    engine: Engine
    context: Context
    guard: Guard
    templates: Jinja2Templates
    jobs: Jobs = field(default_factory=Jobs)
    updates: Updates = field(default_factory=Updates)
    search_images: dict[str, str] = field(default_factory=dict)  # key -> an image URL a search result named
    lock: threading.Lock = field(default_factory=threading.Lock)

    def remember_image(self, key: str, url: str) -> None:
        """Only URLs that our own search results named can be fetched through /media/search/{key}."""
        with self.lock:
            self.search_images[key] = url
            while len(self.search_images) > SEARCH_IMAGES_KEPT:
                del self.search_images[next(iter(self.search_images))]


def create_app(engine: Engine, context: Context, guard: Guard) -> FastAPI:
    """The application for one registry, bound (for the Host check) to `guard`'s address."""
    app = FastAPI(title="adapterzoo", version=__version__, docs_url=None, redoc_url=None,
                  description="The adapterzoo registry, search, pulls, scans and verification over HTTP. "
                              "Shapes are the CLI's --json shapes.")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
    templates = Jinja2Templates(env=env)  # autoescape everything, the SVG heat map too
    templates.env.filters.update(FILTERS)
    templates.env.globals["version"] = __version__
    app.state.zoo = Zoo(engine, context, guard, templates)
    app.include_router(api.router)
    app.include_router(media.router)
    app.include_router(pages.router)
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> RedirectResponse:
        return RedirectResponse("/static/favicon.svg", status_code=301)

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith(("/api/", "/media/", "/static/")):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return pages.render(request, "error.html", exc.status_code, message=str(exc.detail))

    @app.exception_handler(AdapterzooError)
    async def user_error(request: Request, exc: AdapterzooError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **exc.json_details()}, status_code=400)

    app.add_middleware(SecurityMiddleware, guard=guard)
    return app
