"""The operational figures, gathered once, shown three ways: `drh-pacs status`, the status page,
and Prometheus ``/metrics``. One function (:func:`gather`) reads them so the three never disagree.

Figures: queue depths per Celery queue and messages in flight; task outcomes; ingest latency
(C-STORE to searchable); index size per model version and level, the active version and a running
re-index; live workers (from their heartbeats) and the devices their processes loaded the model on;
failure ledger size with the most recent failures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis

from plugin import metrics

QUEUES = ("ingest", "study", "maintenance")

# "duplicate" counts messages whose instance another task already hashed in its batch (or a re-sent
# instance): normal with batching, so say so rather than let it read as a fault.
_OUTCOME_LABELS = {"duplicate": "already done (batched or re-sent)"}


def outcome_label(outcome: str) -> str:
    """How a task outcome is shown to IT staff (terminal and status page alike)."""
    return _OUTCOME_LABELS.get(outcome, outcome)


# Kombu's Redis transport keeps priorities 3, 6 and 9 in separate lists next to the plain one.
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


def _queue_depth(broker: redis.Redis, name: str) -> int:
    pipe = broker.pipeline()
    for suffix in _PRIORITY_SUFFIXES:
        pipe.llen(name + suffix)
    return int(sum(pipe.execute()))


def model_versions(client: redis.Redis, ns: str) -> list[dict[str, Any]]:
    """Every registered model version, the active one first: bits, state, live codes per level and
    instance embeddings (what an old version still costs in Redis)."""
    active = client.get(f"{ns}:model:active")
    active_v = active.decode() if active else None
    out = []
    for raw in client.smembers(f"{ns}:models"):
        version = raw.decode()
        info = {k.decode(): v.decode() for k, v in client.hgetall(f"{ns}:model:{version}").items()}
        if "nbits" not in info:
            continue
        out.append(
            {
                "version": version,
                "nbits": int(info["nbits"]),
                "state": info.get("state", ""),
                "active": version == active_v,
                "created": float(info.get("created", 0) or 0),
                "image": int(client.hlen(f"{ns}:slot:{version}:image")),
                "study": int(client.hlen(f"{ns}:slot:{version}:study")),
                "embeddings": int(client.hlen(f"{ns}:emb:{version}")),
            }
        )
    out.sort(key=lambda m: (not m["active"], -m["created"]))
    return out


def _workers(client: redis.Redis, ns: str) -> list[dict[str, Any]]:
    """Live workers (heartbeat within three periods) and the devices their processes loaded on.

    Two hashes, read whole (never a key scan, which would walk every instance key): ``ns:workers``
    (hostname -> heartbeat, see workers.app) and ``ns:workerprocs`` (hostname|pid -> the device
    and model a pool process loaded, see workers.model).
    """
    from workers.app import HEARTBEAT_SECONDS

    now = time.time()
    beats = {k.decode(): json.loads(v) for k, v in client.hgetall(f"{ns}:workers").items()}
    procs: dict[str, list[dict[str, Any]]] = {}
    for k, v in client.hgetall(f"{ns}:workerprocs").items():
        host = k.decode().rsplit("|", 1)[0]
        proc = json.loads(v)
        started = float(beats.get(host, {}).get("started", now))
        if proc.get("loaded", 0) >= started:  # processes of an earlier run of that worker are gone
            procs.setdefault(host, []).append(proc)
    out = []
    for w in beats.values():
        if now - float(w.get("last_seen", 0)) > 3 * HEARTBEAT_SECONDS:
            continue
        loaded = procs.get(w["hostname"], [])
        devices = sorted({p["device"] for p in loaded})
        w["device"] = ",".join(devices) if devices else str(w.get("device", ""))
        w["models"] = sorted({p["model"] for p in loaded})
        w["age"] = time.time() - float(w.get("last_seen", 0))
        out.append(w)
    out.sort(key=lambda w: w["hostname"])
    return out


def gather(client: redis.Redis, broker: redis.Redis | None = None, ns: str = "drh", recent: int = 20) -> dict[str, Any]:
    """Every figure, from the store's Redis (``client``) and the broker (``broker``, default: same).

    Never raises for an unreachable Redis: ``redis_ok`` is False and ``error`` says why, so the
    status page and ``/metrics`` still answer while Redis is down.
    """
    from workers.failures import FailureLedger
    from workers.reindex import job_key
    from workers.tasks import pending_key

    broker = broker or client
    figures: dict[str, Any] = {"time": time.time(), "redis_ok": False, "namespace": ns}
    try:
        figures["queues"] = {q: _queue_depth(broker, q) for q in QUEUES}
        figures["in_flight"] = int(broker.hlen("unacked"))
        tasks: dict[str, dict[str, int]] = {}
        for k, v in client.hgetall(metrics.tasks_key(ns)).items():
            task, _, outcome = k.decode().partition(":")
            tasks.setdefault(task, {})[outcome] = int(v)
        figures["tasks"] = tasks
        figures["latency"] = metrics.read_latency(client, ns)
        figures["models"] = model_versions(client, ns)
        figures["active_version"] = next((m["version"] for m in figures["models"] if m["active"]), None)
        job = {k.decode(): v.decode() for k, v in client.hgetall(job_key(ns)).items()}
        if job:
            for k in ("done", "total", "failed"):
                job[k] = int(job.get(k, 0) or 0)
        figures["reindex"] = job
        figures["workers"] = _workers(client, ns)
        ledger = FailureLedger(client, ns)
        figures["failures"] = {
            "count": ledger.count(),
            "ignored": ledger.ignored_count(),
            "recent": ledger.list(recent),
        }
        figures["pending"] = int(client.zcard(pending_key(ns)))
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
    if not f["workers"]:
        lines.append("  none alive (start `drh-pacs worker` or `drh-pacs serve`)")
    for w in f["workers"]:
        lines.append(
            f"  {w['hostname']:<32} device {w['device']:<10} x{w['concurrency']}  queues {','.join(w['queues'])}"
            f"  seen {_ago(w['age'])} ago"
        )
    lines.append("")
    lines.append("index")
    if not f["models"]:
        lines.append("  empty (no model version registered yet)")
    for m in f["models"]:
        mark = "*" if m["active"] else " "
        lines.append(
            f" {mark}{m['version']:<28} {m['nbits']:>3} bits  {m['state']:<9}"
            f" images {m['image']:>9}  studies {m['study']:>8}"
        )
    job = f["reindex"]
    if job:
        total = max(1, job["total"])
        lines.append(
            f"  re-index to {job['version']}: {job.get('state', '?')}, {job['done']}/{job['total']} instances"
            f" ({100 * job['done'] / total:.0f} %), {job['failed']} failed"
        )
    lines.append("")
    done = f["tasks"].get("index_instance", {})
    lat = f["latency"]
    p50 = metrics.latency_quantile(lat, 0.5)
    p95 = metrics.latency_quantile(lat, 0.95)
    lines.append(
        "ingest      "
        + ("  ".join(f"{outcome_label(k)} {v}" for k, v in sorted(done.items())) or "no instance received yet")
        + (f"  latency p50 <= {p50:g} s, p95 <= {p95:g} s" if p50 is not None else "")
    )
    pool = f["tasks"].get("pool_study", {})
    if pool:
        lines.append("pooling     " + "  ".join(f"{k} {v}" for k, v in sorted(pool.items())))
    fl = f["failures"]
    lines.append("")
    lines.append(f"failures    {fl['count']} failed, {fl['ignored']} non-image ignored")
    for e in fl["recent"]:
        lines.append(f"  {e['sop_uid']}  {e['state']}  x{e['count']}  last {_ago(f['time'] - e['last_seen'])} ago")
        lines.append(f"      {e['reason']}")
    if fl["count"]:
        lines.append("  retry with `drh-pacs failures retry UID` or `drh-pacs failures retry --all`")
    return "\n".join(lines)


def gather_for_settings(settings: Any) -> dict[str, Any]:
    """Connect with the settings (embedded Redis of a running `serve` included) and gather."""
    from plugin.redis_embedded import resolve_redis_url

    url = resolve_redis_url(settings.redis_url, settings.data_dir)
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    broker = redis.Redis.from_url(settings.broker_url, socket_timeout=5) if settings.broker_url else client
    try:
        return gather(client, broker, settings.redis_namespace)
    finally:
        client.close()
        if broker is not client:
            broker.close()


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs status [--json] [--watch SECONDS]``."""
    from plugin.redis_embedded import EmbeddedRedisError
    from plugin.settings import SettingsError, load_settings

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
