"""The similar-cases page: a radiologist's view of the search, served by the API itself.

- ``GET /similar``: the page (``?study=<StudyInstanceUID>`` or ``?accession=<number>[&patient=<id>]``
  opens it on a reference; the Orthanc Explorer 2 button of ``deploy/orthanc`` links here). It shows
  the reference's images and the most similar studies as rows of thumbnails with date, description,
  modality, distance and score; filters (modality, date range, same or other patients, number of
  results); "open in viewer" links (``Settings.viewer_urls``) and "send to" buttons
  (``Settings.move_destinations``, :mod:`plugin.http.retrieve`); an image file dropped on it is
  searched with ``POST /api/similar/upload``.
- ``GET /api/page``: what the page needs to know: who is logged in, the viewer link templates, the
  send destinations, the default and largest number of results.
- ``GET /static/...``: the page's script and stylesheet, package data (``plugin/http/static``). No
  external CDN: hospital networks are closed, and nothing the page runs comes from elsewhere (the
  Content-Security-Policy says so to the browser).

The page talks to the same public interfaces as any client: the DICOMweb roots of
:mod:`plugin.http.dicomweb` for searches, study details and thumbnails, the JSON upload search of
:mod:`plugin.http.search` for a dropped file.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from plugin.core.settings import VIEWER_URL_FIELDS
from plugin.http.auth import principal_of

# Everything the page loads comes from this origin; it cannot be framed by another site.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _page_html() -> str:
    return resources.files("plugin.http").joinpath("static/similar.html").read_text(encoding="utf-8")


def routes(ctx: Any) -> list[BaseRoute]:
    """The page's routes, bound to ``ctx`` (a :class:`plugin.http.app.ApiContext`)."""
    settings = ctx.settings
    store = ctx.store
    page = _page_html()

    def root(request: Request) -> Response:
        return RedirectResponse("/similar", status_code=303)

    def similar(request: Request) -> Response:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    def answering_routes() -> list[dict[str, Any]]:
        """The answering models, for the kind of a dropped picture (which has no header); none while
        Redis does not answer (the page still opens, and says what a search then runs into)."""
        try:
            table = store.models.matching(settings.unrouted)
        except redis.exceptions.RedisError:
            return []
        return [{"name": r.name, "serves": r.describe(), "general": r.general} for r in table]

    def config(request: Request) -> Response:
        principal = principal_of(request)
        return JSONResponse(
            {
                "user": principal.name if principal else "",
                "kind": principal.kind if principal else "",
                "default_k": settings.default_results,
                "max_k": settings.max_results,
                "viewers": [{"name": n, "url": u} for n, u in settings.viewer_urls.items()],
                "viewer_fields": list(VIEWER_URL_FIELDS),
                "move_destinations": list(settings.move_destinations),
                "routes": answering_routes(),
            },
            headers={"Cache-Control": "no-store"},
        )

    return [
        Route("/", root, methods=["GET"]),
        Route("/similar", similar, methods=["GET"]),
        Route("/api/page", config, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("plugin.http", "static")]), name="static"),
    ]
