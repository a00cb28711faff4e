"""The HTTP API: one Starlette application, guarded by a bearer token or a browser session.

Routes come from the modules that own them: :mod:`plugin.http.search` (the similar search by study,
instance or uploaded file), :mod:`plugin.http.dicomweb` (QIDO-RS similar search and plain queries
for viewers), :mod:`plugin.http.rendered` (WADO-RS thumbnails and rendered frames),
:mod:`plugin.http.pages` (the similar-cases page), :mod:`plugin.http.retrieve` (its "send to"
button), :mod:`plugin.http.auth` (login and sessions) and :mod:`plugin.http.ops` (health, readiness,
metrics, status page, failure retry, spooled files for remote workers). This file only wires them
and guards them: CORS outermost (a browser's preflight is answered before any credential is asked
for), then :class:`plugin.http.auth.Auth`. A new route goes in the module of its concern, listed in
that module's ``routes``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from plugin.core.settings import Settings
from plugin.http import auth, dicomweb, ops, pages, rendered, retrieve, search


@dataclass
class ApiContext:
    """What route handlers need, passed explicitly (no globals)."""

    settings: Settings
    store: Any  # plugin.store.Store
    index: dict[str, Any] = field(default_factory=dict)  # level -> plugin.search.replica.ReplicaIndex
    celery: Any = None  # workers.client Celery application (for retries)
    # The parts the process supervises (embedded Redis, workers, DICOM): name -> {"ok", "detail"}.
    health: Callable[[], dict[str, dict[str, Any]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def create_app(ctx: ApiContext) -> Starlette:
    settings = ctx.settings
    sessions = auth.Sessions(
        settings.resolved_session_secret(),
        settings.resolved_api_token(),
        auth.Users(settings.users_path),
        settings.session_hours,
    )
    renderer = rendered.Renderer(settings, ctx.store)
    routes = [
        *ops.routes(ctx),
        *search.routes(ctx),
        *auth.routes(settings, sessions),
        *pages.routes(ctx),
        *retrieve.routes(ctx),
        *dicomweb.routes(ctx, renderer),
    ]
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Accept", "Content-Type"],
            expose_headers=["Warning", "Content-Location", "Retry-After"],
            allow_credentials=True,
            max_age=600,
        ),
        Middleware(auth.Auth, settings=settings, sessions=sessions),
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.ctx = ctx
    return app
