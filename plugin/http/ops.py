"""HTTP routes for IT staff and for remote workers: health, readiness, metrics, status, retries, files.

- ``GET /health``: 200 when every part this process depends on is up (Redis answers; the embedded
  Redis, the workers and the DICOM listener that ``serve`` supervises are running), else 503 with
  each part's state; always open, for load balancers and watchdogs.
- ``GET /ready``: 200 when Redis answers and a model version is active, else 503 with the reason.
- ``GET /metrics``: Prometheus text, from :func:`plugin.ops.status.gather` (the same figures as below).
- ``GET /status``: the HTML status page (:mod:`plugin.http.status_page`: queues, workers and devices,
  ingest, index sizes, recent failures with a retry button); ``GET /api/status``: the same as JSON.
- ``POST /api/failures/{uid}/retry`` (``uid`` = ``all`` retries every failure): re-queue.
- ``GET /api/instances/{sop_uid}/file``: a spooled DICOM file, for workers on other machines
  (``Settings.api_url``). Only files under the spool directory are ever served.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import redis
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from plugin.core.header import is_uid
from plugin.http.status_page import render_html
from plugin.ops import metrics, status
from plugin.store.broker import broker_client
from workers.client import retry_all_failed, retry_failed


def _broker(ctx: Any) -> redis.Redis:
    client = ctx.extra.get("broker_client")
    if client is None:
        client = ctx.extra["broker_client"] = broker_client(ctx.settings.broker_url, ctx.store.client)
    return client


def _redis_part(ctx: Any) -> dict[str, Any]:
    """Whether the store's Redis answers a PING within a second (a dedicated client: the shared
    one may wait up to its own, longer, timeout)."""
    client = ctx.extra.get("health_client")
    if client is None:
        kwargs = ctx.store.client.connection_pool.connection_kwargs
        client = redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=ctx.store.client.connection_pool.connection_class,
                **{**kwargs, "socket_timeout": 1.0, "socket_connect_timeout": 1.0},
            )
        )
        ctx.extra["health_client"] = client
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        return {"ok": False, "detail": f"not answering: {type(exc).__name__}"}
    return {"ok": True, "detail": "answering"}


def _figures(ctx: Any) -> dict[str, Any]:
    """The figures, with this process's surroundings (spool disk, Orthanc) and, in ``serve``, the
    DICOM listener's counters (``ctx.extra["dicom_counters"]``)."""
    return status.gather(ctx.store, _broker(ctx), settings=ctx.settings, dicom=ctx.extra.get("dicom_counters"))


def _jsonable(value: Any) -> Any:
    """Infinity (the last histogram bound) is not JSON: write it as Prometheus does, "+Inf"."""
    if isinstance(value, float) and math.isinf(value):
        return "+Inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def routes(ctx: Any) -> list[Route]:
    """The routes of this module, bound to ``ctx`` (a :class:`plugin.http.app.ApiContext`)."""

    def health(request: Request) -> Response:
        parts = {"redis": _redis_part(ctx)}
        if ctx.health is not None:
            parts.update(ctx.health())
        ok = all(p["ok"] for p in parts.values())
        body = {"status": "ok" if ok else "unhealthy", "parts": parts, "time": time.time()}
        return JSONResponse(body, status_code=200 if ok else 503)

    def ready(request: Request) -> Response:
        reasons = []
        try:
            ctx.store.ping()
            if not ctx.store.models.active_routes():
                reasons.append("no model version active yet (nothing indexed)")
        except redis.exceptions.RedisError as exc:
            reasons.append(f"Redis unavailable: {exc}")
        for level, index in (ctx.index or {}).items():
            if getattr(index, "ready", True) is False:
                reasons.append(f"{level} index still loading")
        code = 200 if not reasons else 503
        return JSONResponse({"ready": not reasons, "reasons": reasons}, status_code=code)

    def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(_figures(ctx)), media_type=metrics.CONTENT_TYPE)

    def api_status(request: Request) -> Response:
        figures = _figures(ctx)
        return JSONResponse(_jsonable(figures), status_code=200 if figures["redis_ok"] else 503)

    def status_page(request: Request) -> Response:
        figures = _figures(ctx)
        return HTMLResponse(render_html(figures), status_code=200 if figures["redis_ok"] else 503)

    def retry(request: Request) -> Response:
        uid = request.path_params["uid"]
        if ctx.celery is None:
            return JSONResponse({"error": "no Celery application configured in this process"}, status_code=503)
        try:
            if uid == "all":
                return JSONResponse({"retried": retry_all_failed(ctx.celery)})
            if not is_uid(uid):
                return JSONResponse({"error": "not a DICOM UID"}, status_code=400)
            if not retry_failed(ctx.celery, uid):
                return JSONResponse({"error": f"{uid} is not in the failure ledger"}, status_code=404)
        except Exception as exc:  # broker down: say so, the entry stays in the ledger
            return JSONResponse({"error": f"could not re-queue: {exc}"}, status_code=503)
        return JSONResponse({"retried": 1, "sop_uid": uid})

    def instance_file(request: Request) -> Response:
        sop = request.path_params["sop_uid"]
        if not is_uid(sop):
            return JSONResponse({"error": "not a DICOM UID"}, status_code=400)
        path = _spooled_path(ctx, sop)
        if path is None:
            return JSONResponse({"error": f"no spooled file for {sop}"}, status_code=404)
        return FileResponse(path, media_type="application/dicom")

    return [
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/status", status_page, methods=["GET"]),
        Route("/api/status", api_status, methods=["GET"]),
        Route("/api/failures/{uid}/retry", retry, methods=["POST"]),
        Route("/api/instances/{sop_uid}/file", instance_file, methods=["GET"]),
    ]


def _spooled_path(ctx: Any, sop: str) -> Path | None:
    """Where the SCP spooled ``sop``: the path recorded by the enqueue or the indexer, else a search
    of the spool; never a file outside the spool directory."""
    spool = ctx.settings.spool_dir.resolve()
    candidates: list[str] = []
    try:
        payload = ctx.store.ingest.payload(sop)
        if payload:
            candidates.append(payload["path"])
        recorded = ctx.store.records.instance(sop).get("path")
        if recorded:
            candidates.append(recorded)
    except redis.exceptions.RedisError:
        pass
    candidates += [str(p) for p in spool.glob(f"*/{sop}.dcm")]
    for c in candidates:
        p = Path(c).resolve()
        if p.is_relative_to(spool) and p.is_file():
            return p
    return None
