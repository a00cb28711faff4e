"""The operational figures, gathered once, shown three ways: `drh-pacs status`, the status page,
and Prometheus ``/metrics``. One function (:func:`gather`) reads them so the three never disagree.

Figures: queue depths per Celery queue and messages in flight; task outcomes; ingest latency
(C-STORE to searchable); index size per model version and level, the active version and a running
re-index; workers (from their heartbeats: online, refusing their device, offline, stopped) and the
devices their processes loaded the model on; failure ledger size with the most recent failures and
C-STORE refusals; and, with the settings of the process, the spool's disk and whether Orthanc
answers; with the SCP's counters (in ``serve``), what the DICOM listener did.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from typing import Any

import redis

from plugin.core.redis_server import EmbeddedRedisError, resolve_redis_url
from plugin.core.settings import Settings, SettingsError, load_settings
from plugin.ops import metrics
from plugin.store import Store, worker_state
from plugin.store.broker import broker_client, in_flight, queue_depth
from plugin.store.stats import MODALITY_OUTCOMES
from workers.client import QUEUES

# "duplicate" counts messages whose instance another task already hashed in its batch (or a re-sent
# instance): normal with batching, so say so rather than let it read as a fault.
_OUTCOME_LABELS = {"duplicate": "hashed by another task's batch, or re-sent"}


def outcome_label(outcome: str) -> str:
    """How a task outcome is shown to IT staff (terminal and status page alike)."""
    return _OUTCOME_LABELS.get(outcome, outcome)


def model_versions(store: Store) -> list[dict[str, Any]]:
    """Every registered model version, the answering ones first (by route): its route, bits, state,
    live codes per level, instance embeddings and query variants (what an old version still costs
    in Redis)."""
    answering = set(store.models.active_routes().values())
    out = []
    for version in store.models.versions():
        info = store.models.details(version)
        if "nbits" not in info:
            continue
        route = store.models.route_of(version)
        out.append(
            {
                "version": version,
                "route": route.name,
                "serves": route.describe(),
                "general": route.general,
                "nbits": int(info["nbits"]),
                "state": info.get("state", ""),
                "active": version in answering,
                "created": float(info.get("created", 0) or 0),
                "image": store.codes.count(version, "image"),
                "series": store.codes.count(version, "series"),
                "study": store.codes.count(version, "study"),
                "embeddings": store.embeddings.count(version),
                "variants": store.embeddings.variants_count(version),
            }
        )
    out.sort(key=lambda m: (not m["active"], m["route"], -m["created"]))
    return out


def _workers(store: Store) -> list[dict[str, Any]]:
    """Every worker heard of in the last week, with its ``state`` (online, starting, refused: its
    device is unusable, offline: silent for three heartbeats, stopped: exited cleanly), its last-seen
    time and the devices its processes loaded the model on. A worker that dies is marked, not dropped.
    """
    now = time.time()
    beats = store.workers.heartbeats()
    procs: dict[str, list[dict[str, Any]]] = {}
    for host, records in store.workers.processes().items():
        started = float(beats.get(host, {}).get("started", now))
        # processes of an earlier run of that worker are gone
        procs[host] = [p for p in records if p.get("loaded", 0) >= started]
    out = []
    for w in beats.values():
        w["state"] = worker_state(w, now)
        w["reason"] = str(w.get("reason") or "")
        loaded = procs.get(w["hostname"], []) if w["state"] == "online" else []
        devices = sorted({p["device"] for p in loaded})
        w["device"] = ",".join(devices) if devices else str(w.get("device", ""))
        w["models"] = sorted({p["model"] for p in loaded})
        w["age"] = now - float(w.get("last_seen", 0))
        out.append(w)
    out.sort(key=lambda w: (w["state"] == "stopped", w["hostname"]))
    return out


# Seconds the status waits for Orthanc's answer (a scrape must not hang on a PACS that is down).
ORTHANC_PROBE_SECONDS = 2.0
LISTENER_PROBE_SECONDS = 3.0
# Under this much free space on the spool's disk, the terminal says LOW (the alert says it at 10 % too).
SPOOL_LOW_PERCENT = 10.0


def spool_disk(settings: Settings) -> dict[str, Any]:
    """Free and total bytes of the file system holding the spool (where C-STOREs are written)."""
    path = settings.spool_dir if settings.spool_dir.exists() else settings.data_dir
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return {"path": str(path), "ok": False, "error": str(exc)}
    return {"path": str(path), "ok": True, "free": usage.free, "total": usage.total}


def orthanc_reachability(settings: Settings) -> dict[str, Any] | None:
    """Whether Orthanc's REST API answers drh-pacs (None when no Orthanc is configured). ``up`` means
    usable: a refused password is down, with the reason."""
    if not settings.orthanc_url:
        return None
    import requests

    url = settings.orthanc_url.rstrip("/")
    auth = (settings.orthanc_user, settings.orthanc_password) if settings.orthanc_user else None
    out: dict[str, Any] = {"url": url, "up": False, "error": ""}
    try:
        answer = requests.get(f"{url}/system", auth=auth, timeout=ORTHANC_PROBE_SECONDS)
        out["up"] = answer.status_code == 200
        if answer.status_code in (401, 403):
            out["error"] = f"credentials refused (HTTP {answer.status_code})"
        elif answer.status_code != 200:
            out["error"] = f"HTTP {answer.status_code}"
    except requests.RequestException as exc:
        out["error"] = f"unreachable: {type(exc).__name__}"
    return out


def reconcile_info(store: Store, url: str) -> dict[str, Any]:
    """How the last reconciliation with Orthanc went (``last_ok`` 0: never)."""
    info = store.backfill(url).info()
    return {
        "last_ok": float(info.get("last_ok", 0) or 0),
        "last_error": info.get("last_error", ""),
        "since": int(info["since"]) if info.get("since") else None,
    }


def gather(
    store: Store,
    broker: redis.Redis | None = None,
    recent: int = 20,
    *,
    settings: Settings | None = None,
    dicom: Any = None,
) -> dict[str, Any]:
    """Every figure, from the store and the broker (``broker``, default: the store's Redis); with
    ``settings``, the spool's disk and Orthanc; with ``dicom`` (the SCP's
    :class:`~plugin.dicom.counters.DicomCounters`), the DICOM listener's counts.

    Never raises for an unreachable Redis: ``redis_ok`` is False and ``error`` says why, so the
    status page and ``/metrics`` still answer while Redis is down.
    """
    broker = broker or store.client
    figures: dict[str, Any] = {"time": time.time(), "redis_ok": False, "namespace": store.namespace}
    if dicom is not None:
        figures["dicom"] = dicom.snapshot()
    if settings is not None:
        figures["spool"] = spool_disk(settings)
        figures["orthanc"] = orthanc_reachability(settings)
    try:
        figures["queues"] = {q: queue_depth(broker, q) for q in QUEUES}
        figures["in_flight"] = in_flight(broker)
        figures["tasks"] = store.stats.tasks()
        figures["latency"] = store.stats.latency()
        figures["models"] = model_versions(store)
        figures["active_version"] = store.models.active()
        figures["routes"] = [
            {"route": route.name, "serves": route.describe(), "general": route.general, "version": version}
            for route, version in store.models.table()
        ]
        figures["no_model"] = store.stats.no_model()
        figures["by_modality"] = store.stats.by_modality()
        job: dict[str, Any] = store.reindex.get()
        if job:
            for k in ("done", "total", "failed"):
                job[k] = int(job.get(k, 0) or 0)
        figures["reindex"] = job
        figures["workers"] = _workers(store)
        figures["failures"] = {
            "count": store.ledger.count(),
            "ignored": store.ledger.ignored_count(),
            "recent": store.ledger.list(recent),
            "refused": store.ledger.refused_count(),
            "recent_refused": store.ledger.refused(recent),
        }
        figures["pending"] = store.ingest.pending_count()
        if figures.get("orthanc") and settings is not None and settings.orthanc_reconcile_seconds > 0:
            figures["orthanc"]["reconcile"] = reconcile_info(store, figures["orthanc"]["url"])
        figures["redis_ok"] = True
    except redis.exceptions.RedisError as exc:
        figures["error"] = f"Redis unavailable: {exc}"
    return figures


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def render_text(f: dict[str, Any]) -> str:
    """The figures for a terminal."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["time"]))
    lines = [f"drh-pacs status at {when} (namespace {f['namespace']})"]
    if not f["redis_ok"]:
        lines.append(f"  {f.get('error', 'Redis unavailable')}")
        return "\n".join(lines)
    q = f["queues"]
    lines.append("")
    lines.append("queues      " + "  ".join(f"{name} {n}" for name, n in q.items()) + f"  (in flight {f['in_flight']})")
    lines.append(f"batching    {f['pending']} instance(s) pending for the model")
    lines.append("")
    lines.append("workers")
    if not any(w["state"] == "online" for w in f["workers"]):
        lines.append("  NONE ONLINE: nothing is being indexed (start `drh-pacs worker` or `drh-pacs serve`)")
    for w in f["workers"]:
        mark = w["state"].upper() if w["state"] in ("offline", "refused") else w["state"]
        lines.append(
            f"  {w['hostname']:<32} {mark:<8} device {w['device']:<10} x{w['concurrency']}"
            f"  queues {','.join(w['queues'])}  seen {_ago(w['age'])} ago"
        )
        if w["reason"]:
            lines.append(f"      {w['reason']}")
    lines.append("")
    lines.append("index")
    if not f["models"]:
        lines.append("  empty (no model version registered yet)")
    for m in f["models"]:
        mark = "*" if m["active"] else " "
        lines.append(
            f" {mark}{m['version']:<28} {m['nbits']:>3} bits  {m['state']:<9}"
            f" images {m['image']:>9}  series {m['series']:>8}  studies {m['study']:>8}  route {m['serves']}"
        )
    waiting = f.get("no_model") or {}
    if waiting:
        per = ", ".join(f"{mod} {n}" for mod, n in sorted(waiting.items()))
        lines.append(f"  stored without a model (no route takes them): {per}")
    by_modality = f.get("by_modality") or {}
    if by_modality:
        # Arrivals, not distinct images: an image the PACS sends again is indexed (and counted) again.
        lines.append("  by modality     indexed to general    failed   ignored  no model   (each arrival counts)")
        for mod, counts in sorted(by_modality.items()):
            figures_row = "".join(f" {counts[o]:>{10 if o == 'to-general' else 9}}" for o in MODALITY_OUTCOMES)
            lines.append(f"    {mod:<12}{figures_row}")
        if any(counts["to-general"] for counts in by_modality.values()):
            lines.append(
                "    to general: read by the general model though a route takes their modality; their header"
                " named none of its body parts (README, 'Which body part routing reads')"
            )
    job = f["reindex"]
    if job:
        total = max(1, job["total"])
        lines.append(
            f"  {'re-sort into' if job.get('mode') == 'resort' else 're-index to'} {job['version']}:"
            f" {job.get('state', '?')}, {job['done']}/{job['total']} instances"
            f" ({100 * job['done'] / total:.0f} %), {job['failed']} failed"
        )
    lines.append("")
    done = f["tasks"].get("index_instance", {})
    lat = f["latency"]
    p50 = metrics.latency_quantile(lat, 0.5)
    p95 = metrics.latency_quantile(lat, 0.95)
    lines.append(
        "ingest      "
        + (
            "  ".join(f"{outcome_label(k)} {v}" for k, v in sorted(done.items()) if v)
            or ("none settled yet" if f["pending"] or any(q.values()) else "no instance received yet")
        )
        + (f"  latency p50 <= {p50:g} s, p95 <= {p95:g} s" if p50 is not None else "")
    )
    pool = f["tasks"].get("pool_study", {})
    if any(pool.values()):
        lines.append("pooling     " + "  ".join(f"{k} {v}" for k, v in sorted(pool.items()) if v))
    fl = f["failures"]
    lines.append("")
    lines.append(
        f"failures    {fl['count']} failed, {fl['ignored']} non-image ignored,"
        f" {fl['refused']} refused at reception (`drh-pacs failures refused`)"
    )
    for e in fl["recent"]:
        lines.append(f"  {e['sop_uid']}  {e['state']}  x{e['count']}  last {_ago(f['time'] - e['last_seen'])} ago")
        lines.append(f"      {e['reason']}")
    if fl["count"]:
        lines.append("  retry with `drh-pacs failures retry UID` or `drh-pacs failures retry --all`")
    lines += _text_surroundings(f)
    return "\n".join(lines)


def _text_surroundings(f: dict[str, Any]) -> list[str]:
    """The spool's disk and Orthanc, when the figures have them (``drh-pacs status`` runs on the
    machine of ``serve``); the DICOM listener's counts, read from serve's process."""
    lines: list[str] = []
    spool = f.get("spool")
    if spool:
        lines.append("")
        if spool["ok"]:
            pct = 100 * spool["free"] / max(1, spool["total"])
            low = " LOW: C-STOREs are refused (out of resources) when it is full" if pct < SPOOL_LOW_PERCENT else ""
            lines.append(f"spool       {_size(spool['free'])} free of {_size(spool['total'])} ({pct:.0f} %){low}")
        else:
            lines.append(f"spool       UNREADABLE: {spool['error']}")
    orthanc = f.get("orthanc")
    if orthanc:
        state = "answers" if orthanc["up"] else f"DOWN: {orthanc['error']}"
        lines.append(f"orthanc     {orthanc['url']} {state}")
        rec = orthanc.get("reconcile") or {}
        if rec.get("last_error"):
            lines.append(f"      last reconciliation failed: {rec['last_error']}")
        elif rec.get("last_ok"):
            lines.append(f"      last reconciliation {_ago(f['time'] - rec['last_ok'])} ago")
    dicom = f.get("dicom")
    if dicom:
        done = {k: v for k, v in dicom["requests"].items() if v}
        lines.append(
            f"dicom       {dicom['active_associations']} association(s) open, "
            + "  ".join(f"{k} {v}" for k, v in dicom["associations"].items())
            + ("  " + "  ".join(f"{k.replace('|', ' ')} {v}" for k, v in sorted(done.items())) if done else "")
        )
        rejected = {k: v for k, v in dicom.get("rejections", {}).items() if v}
        if rejected:
            lines.append(
                "      associations REJECTED: "
                + "  ".join(f"{k} {v}" for k, v in rejected.items())
                + " (calling-ae: a peer storing is not in DRH_ALLOWED_CALLING_AES, or one calling SIMILAR is"
                " not in DRH_DICOM_VIEWERS)"
            )
        refused = {k: v for k, v in dicom.get("admission_refusals", {}).items() if v}
        if refused:
            lines.append("      refused by admission control: " + "  ".join(f"{k} {v}" for k, v in refused.items()))
        failed = dicom.get("requests", {}).get("C-STORE|failure", 0)
        if failed:
            lines.append(
                f"      C-STORE answered with a failure {failed} time(s): malformed data (`drh-pacs failures"
                " refused`) or out of resources (the spool's disk; the log says which)"
            )
        unqueued = dicom.get("spool_unqueued", 0)
        if unqueued:
            lines.append(
                f"      {unqueued} file(s) safe in the spool and NOT QUEUED for the workers yet (the broker was"
                " down: the listener queues them again every 30 s)"
            )
        non_image = dicom.get("contexts_rejected", {}).get("non-image", 0)
        if non_image:
            lines.append(
                f"      non-image storage classes refused at negotiation {non_image} times"
                " (once per class per association that proposed it, whether or not it then had such an"
                " object; DRH_NON_IMAGE_POLICY=reject: their senders keep those objects)"
            )
        forwards = dicom.get("move_forwards", {})
        if forwards.get("refused"):
            lines.append(f"      C-MOVE forwards REFUSED by the source PACS {forwards['refused']} (see the log)")
        if forwards.get("unreachable"):
            lines.append(f"      C-MOVE forwards to an UNREACHABLE source PACS {forwards['unreachable']}")
    elif f.get("dicom_unread"):
        lines.append(f"dicom       counts not read: {f['dicom_unread']}")
    return lines


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def listener_counts(settings: Settings) -> tuple[dict[str, Any] | None, str]:
    """The DICOM listener's counts from the running ``serve``'s HTTP API ((counts, "") or (None, why)):
    they live in that process, not in Redis. Asked on this machine, with the API token."""
    import requests

    host = settings.http_host if settings.http_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{settings.http_port}/api/status"
    if not (settings.api_token or (settings.data_dir / "api-token").exists()):
        return None, (
            f"no API token (DRH_API_TOKEN, or {settings.data_dir / 'api-token'}: is serve's DRH_DATA_DIR the same?)"
        )
    try:
        answer = requests.get(
            url, headers={"Authorization": f"Bearer {settings.resolved_api_token()}"}, timeout=LISTENER_PROBE_SECONDS
        )
        # 503: serve's Redis is down, which is when these counts matter most; they are in the body
        body = answer.json() if answer.status_code in (200, 503) else {}
    except (requests.RequestException, ValueError) as exc:
        return None, f"serve's HTTP API at {url} did not answer ({type(exc).__name__})"
    if not isinstance(body, dict) or not body.get("dicom"):
        return None, f"serve's HTTP API at {url} answered HTTP {answer.status_code} without them"
    return body["dicom"], ""


def gather_for_settings(settings: Settings) -> dict[str, Any]:
    """Connect with the settings (embedded Redis of a running `serve` included) and gather; the DICOM
    listener's counts come from serve's HTTP API."""
    url = resolve_redis_url(settings.redis_url, settings.data_dir)
    store = Store.from_url(url, settings.redis_namespace, socket_timeout=5, socket_connect_timeout=5)
    broker = broker_client(settings.broker_url, store.client)
    try:
        figures = gather(store, broker, settings=settings)
    finally:
        store.close()
        if broker is not store.client:
            broker.close()
    dicom, why = listener_counts(settings)
    if dicom:
        figures["dicom"] = dicom
    else:
        figures["dicom_unread"] = why
    return figures


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs status [--json] [--watch SECONDS]``."""
    parser = argparse.ArgumentParser(prog="drh-pacs status", description="queues, workers, index, failures")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"drh-pacs status: {exc}", file=sys.stderr)
        return 2
    while True:
        try:
            figures = gather_for_settings(settings)
        except EmbeddedRedisError as exc:
            print(f"drh-pacs status: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(figures, indent=2, default=str))
        else:
            if args.watch:
                print("\x1b[2J\x1b[H", end="")
            print(render_text(figures))
        if not args.watch:
            return 0 if figures["redis_ok"] else 1
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
