"""The HTTP API: one Starlette application, authenticated by a bearer token.

Routes come from the modules that own them: :mod:`plugin.http.search` (the similar search by study,
instance or uploaded file) and :mod:`plugin.http.ops` (health, readiness, metrics, status page,
failure retry, spooled files for remote workers). This file only wires them and guards them. A new
route goes in the module of its concern, listed in that module's ``routes``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from plugin.core.settings import Settings
from plugin.http import ops, search

# Paths that answer without a token when Settings.api_open_readonly is set. /health always does:
# a load balancer or systemd watchdog has no token.
ALWAYS_OPEN = {"/health"}
READONLY_OPEN_PREFIXES = ("/ready", "/metrics", "/status")


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


class TokenAuth(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str, open_readonly: bool) -> None:
        super().__init__(app)
        self.token = token.encode()
        self.open_readonly = open_readonly

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        path = request.url.path
        if path in ALWAYS_OPEN or (
            self.open_readonly and request.method == "GET" and path.startswith(READONLY_OPEN_PREFIXES)
        ):
            return await call_next(request)
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        return await call_next(request)


def create_app(ctx: ApiContext) -> Starlette:
    routes = [*ops.routes(ctx), *search.routes(ctx)]
    middleware = [
        Middleware(TokenAuth, token=ctx.settings.resolved_api_token(), open_readonly=ctx.settings.api_open_readonly)
    ]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.ctx = ctx
    return app
