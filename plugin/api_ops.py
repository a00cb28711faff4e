"""HTTP routes for IT staff and for remote workers: health, readiness, metrics, status, retries, files.

- ``GET /health``: liveness (the process answers); always open, for load balancers and watchdogs.
- ``GET /ready``: 200 when Redis answers and a model version is active, else 503 with the reason.
- ``GET /metrics``: Prometheus text, from :func:`plugin.status.gather` (the same figures as below).
- ``GET /status``: the HTML status page (queues, workers and devices, ingest, index sizes, recent
  failures with a retry button); ``GET /api/status``: the same as JSON.
- ``POST /api/failures/{uid}/retry`` (``uid`` = ``all`` retries every failure): re-queue.
- ``GET /api/instances/{sop_uid}/file``: a spooled DICOM file, for workers on other machines
  (``Settings.api_url``). Only files under the spool directory are ever served.
"""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any

import redis
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from plugin import metrics, status
from plugin.dicom_meta import is_uid


def _broker(ctx: Any) -> redis.Redis:
    client = ctx.extra.get("broker_client")
    if client is None:
        url = ctx.settings.broker_url
        client = redis.Redis.from_url(url, socket_timeout=5) if url else ctx.store.r
        ctx.extra["broker_client"] = client
    return client


def _figures(ctx: Any) -> dict[str, Any]:
    return status.gather(ctx.store.r, _broker(ctx), ctx.settings.redis_namespace)


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
    """The routes of this module, bound to ``ctx`` (a :class:`plugin.http_api.ApiContext`)."""

    def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "time": time.time()})

    def ready(request: Request) -> Response:
        reasons = []
        try:
            ctx.store.r.ping()
            if ctx.store.active_version() is None:
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
        from workers.failures import FailureLedger

        uid = request.path_params["uid"]
        ledger = FailureLedger(ctx.store.r, ctx.settings.redis_namespace)
        if ctx.celery is None:
            return JSONResponse({"error": "no Celery application configured in this process"}, status_code=503)
        try:
            if uid == "all":
                return JSONResponse({"retried": ledger.retry_all(ctx.celery)})
            if not is_uid(uid):
                return JSONResponse({"error": "not a DICOM UID"}, status_code=400)
            if not ledger.retry(ctx.celery, uid):
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
    ns = ctx.settings.redis_namespace
    try:
        raw = ctx.store.r.hget(f"{ns}:ingest:payload", sop)
        if raw:
            candidates.append(json.loads(raw)["path"])
        recorded = ctx.store.r.hget(f"{ns}:instance:{sop}", "path")
        if recorded:
            candidates.append(recorded.decode())
    except redis.exceptions.RedisError:
        pass
    candidates += [str(p) for p in spool.glob(f"*/{sop}.dcm")]
    for c in candidates:
        p = Path(c).resolve()
        if p.is_relative_to(spool) and p.is_file():
            return p
    return None


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>drh-pacs status</title>
<meta http-equiv="refresh" content="15">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.2em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f0f0f0; }} .bad {{ color: #a00; font-weight: bold; }} .num {{ text-align: right; }}
</style></head><body>
<h1>drh-pacs status</h1><p>{when} &middot; namespace <code>{ns}</code> &middot; refreshes every 15 s</p>
{body}
<script>
async function retry(uid) {{
  let token = localStorage.getItem("drh-token");
  if (!token) {{ token = prompt("API token (kept in this browser)"); if (!token) return;
                 localStorage.setItem("drh-token", token); }}
  const r = await fetch("/api/failures/" + encodeURIComponent(uid) + "/retry",
                        {{method: "POST", headers: {{"Authorization": "Bearer " + token}}}});
  if (r.status === 401) localStorage.removeItem("drh-token");
  const j = await r.json(); alert(r.ok ? "re-queued " + (j.retried || 0) : (j.error || r.status));
  location.reload();
}}
</script></body></html>"""


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(f: dict[str, Any]) -> str:
    """The status page for IT staff: the figures of :func:`plugin.status.gather`."""
    e = html.escape
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["time"]))
    if not f["redis_ok"]:
        body = f"<p class='bad'>{e(f.get('error', 'Redis unavailable'))}</p>"
        return _PAGE.format(when=when, ns=e(f["namespace"]), body=body)
    parts = ["<h2>Queues</h2>"]
    parts.append(
        _table(
            ["queue", "waiting"],
            [[e(q), f"<span class='num'>{n}</span>"] for q, n in f["queues"].items()]
            + [["in flight", f["in_flight"]], ["pending for the model", f["pending"]]],
        )
    )
    parts.append("<h2>Workers</h2>")
    if f["workers"]:
        parts.append(
            _table(
                ["worker", "device", "processes", "queues", "models", "last seen"],
                [
                    [
                        e(w["hostname"]),
                        e(w["device"]),
                        w["concurrency"],
                        e(",".join(w["queues"])),
                        e(",".join(w.get("models", []))),
                        f"{w['age']:.0f} s ago",
                    ]
                    for w in f["workers"]
                ],
            )
        )
    else:
        parts.append("<p class='bad'>No worker alive: nothing will be indexed.</p>")
    parts.append("<h2>Ingest</h2>")
    lat = f["latency"]
    p50 = metrics.latency_quantile(lat, 0.5)
    p95 = metrics.latency_quantile(lat, 0.95)
    rows = [
        [e(t), e(status.outcome_label(o)), n] for t, outs in sorted(f["tasks"].items()) for o, n in sorted(outs.items())
    ]
    parts.append(_table(["task", "outcome", "count"], rows))
    if p50 is not None:
        parts.append(f"<p>C-STORE to searchable: median &le; {p50:g} s, 95th percentile &le; {p95:g} s.</p>")
    parts.append("<h2>Index</h2>")
    parts.append(
        _table(
            ["model version", "bits", "state", "active", "image codes", "study codes"],
            [
                [e(m["version"]), m["nbits"], e(m["state"]), "yes" if m["active"] else "", m["image"], m["study"]]
                for m in f["models"]
            ],
        )
    )
    job = f["reindex"]
    if job:
        parts.append(
            f"<p>Re-index to <code>{e(job.get('version', ''))}</code>: {e(job.get('state', ''))},"
            f" {job['done']} / {job['total']} instances, {job['failed']} failed.</p>"
        )
    fl = f["failures"]
    parts.append(f"<h2>Failures</h2><p>{fl['count']} failed, {fl['ignored']} non-image objects ignored.")
    if fl["count"]:
        parts.append(" <button onclick=\"retry('all')\">retry all</button>")
    parts.append("</p>")
    if fl["recent"]:
        parts.append(
            _table(
                ["SOP Instance UID", "reason", "kind", "state", "count", "first seen", "last seen", ""],
                [
                    [
                        f"<code>{e(x['sop_uid'])}</code>",
                        e(x["reason"]),
                        e(x["kind"]),
                        e(x["state"]),
                        x["count"],
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["first_seen"])),
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["last_seen"])),
                        # a UID is digits and dots; anything else never reaches a script
                        f"<button onclick=\"retry('{x['sop_uid']}')\">retry</button>" if is_uid(x["sop_uid"]) else "",
                    ]
                    for x in fl["recent"]
                ],
            )
        )
    return _PAGE.format(when=when, ns=e(f["namespace"]), body="".join(parts))
