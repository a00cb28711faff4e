"""Prometheus metrics, and the counters workers keep in Redis to feed them.

Workers are separate processes, often on other machines, so their counts cannot live in a
prometheus-client registry of one process: each worker increments counters in Redis (two keys,
below), and the API process renders them, together with the live figures of :mod:`plugin.status`,
at ``/metrics``. Every scrape reads the same figures as the status page and ``drh-pacs status``.

==========================  =====  =================================================================
``ns:stats:tasks``          hash   ``<task>:<outcome>`` -> count (outcomes: done, failed, retried,
                                   ignored, duplicate, deferred)
``ns:stats:latency``        hash   ingest latency histogram, C-STORE to searchable: ``le:<bound>``
                                   -> count in that bucket (not cumulative), ``sum``, ``count``.
                                   Measured from the SCP's reception time to the moment the code is
                                   in Redis; the query process's replica picks it up within its
                                   refresh period (0.5 s in ``serve``).
==========================  =====  =================================================================
"""

from __future__ import annotations

from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. From "as fast as one model batch" to "a re-index backlog".
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


def tasks_key(ns: str) -> str:
    return f"{ns}:stats:tasks"


def latency_key(ns: str) -> str:
    return f"{ns}:stats:latency"


def count_task(client: redis.Redis, ns: str, task: str, outcome: str, n: int = 1) -> None:
    """Count one task outcome; never raises (metrics must not fail a task)."""
    try:
        client.hincrby(tasks_key(ns), f"{task}:{outcome}", n)
    except redis.exceptions.RedisError:
        pass


def observe_latency(client: redis.Redis, ns: str, seconds: float) -> None:
    """Add one C-STORE-to-searchable latency to the histogram; never raises."""
    seconds = max(0.0, seconds)
    bound = next((b for b in LATENCY_BUCKETS if seconds <= b), float("inf"))
    try:
        pipe = client.pipeline()
        pipe.hincrby(latency_key(ns), f"le:{bound}", 1)
        pipe.hincrbyfloat(latency_key(ns), "sum", seconds)
        pipe.hincrby(latency_key(ns), "count", 1)
        pipe.execute()
    except redis.exceptions.RedisError:
        pass


def read_latency(client: redis.Redis, ns: str) -> dict[str, Any]:
    """{"buckets": [(bound, cumulative count)...], "sum", "count"} with +Inf last."""
    raw = {k.decode(): v.decode() for k, v in client.hgetall(latency_key(ns)).items()}
    cumulative = 0
    buckets = []
    for bound in (*LATENCY_BUCKETS, float("inf")):
        cumulative += int(raw.get(f"le:{bound}", 0))
        buckets.append((bound, cumulative))
    return {"buckets": buckets, "sum": float(raw.get("sum", 0.0)), "count": int(raw.get("count", 0))}


def latency_quantile(latency: dict[str, Any], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (what Prometheus would interpolate to)."""
    total = latency["count"]
    if not total:
        return None
    for bound, cum in latency["buckets"]:
        if cum >= q * total:
            return bound
    return float("inf")


class _FiguresCollector:
    def __init__(self, figures: dict[str, Any]) -> None:
        self.f = figures

    def collect(self) -> Any:
        f = self.f
        up = GaugeMetricFamily("drh_redis_up", "1 when Redis (store and broker) answered this scrape")
        up.add_metric([], 1.0 if f.get("redis_ok") else 0.0)
        yield up
        if not f.get("redis_ok"):
            return
        depth = GaugeMetricFamily("drh_queue_depth", "messages waiting in a Celery queue", labels=["queue"])
        for name, n in f["queues"].items():
            depth.add_metric([name], n)
        yield depth
        unacked = GaugeMetricFamily("drh_tasks_in_flight", "messages delivered to workers, not yet acknowledged")
        unacked.add_metric([], f["in_flight"])
        yield unacked
        tasks = CounterMetricFamily("drh_tasks", "task outcomes", labels=["task", "outcome"])
        for task, outcomes in f["tasks"].items():
            for outcome, n in outcomes.items():
                tasks.add_metric([task, outcome], n)
        yield tasks
        lat = f["latency"]
        hist = HistogramMetricFamily(
            "drh_ingest_latency_seconds", "time from C-STORE received to instance code searchable"
        )
        hist.add_metric(
            [],
            [("+Inf" if b == float("inf") else repr(b), c) for b, c in lat["buckets"]],
            sum_value=lat["sum"],
        )
        yield hist
        codes = GaugeMetricFamily(
            "drh_index_codes", "codes stored per model version and level", labels=["version", "level", "active"]
        )
        for v in f["models"]:
            for level in ("image", "study"):
                codes.add_metric([v["version"], level, "1" if v["active"] else "0"], v[level])
        yield codes
        workers = GaugeMetricFamily(
            "drh_worker_processes", "Celery worker processes alive, by worker and device", labels=["worker", "device"]
        )
        for w in f["workers"]:
            workers.add_metric([w["hostname"], w["device"]], w["concurrency"])
        yield workers
        failures = GaugeMetricFamily("drh_failed_instances", "instances in the failure ledger")
        failures.add_metric([], f["failures"]["count"])
        yield failures
        ignored = GaugeMetricFamily("drh_ignored_instances", "non-image objects accepted and not indexed")
        ignored.add_metric([], f["failures"]["ignored"])
        yield ignored
        pending = GaugeMetricFamily("drh_batch_pending", "instances queued for the model, not yet claimed")
        pending.add_metric([], f["pending"])
        yield pending
        job = f.get("reindex") or {}
        if job:
            prog = GaugeMetricFamily(
                "drh_reindex_instances", "re-index progress: instances done and total", labels=["version", "kind"]
            )
            prog.add_metric([job["version"], "done"], job["done"])
            prog.add_metric([job["version"], "total"], job["total"])
            yield prog


def render(figures: dict[str, Any]) -> bytes:
    """The Prometheus text exposition of one :func:`plugin.status.gather` result."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FiguresCollector(figures))  # type: ignore[arg-type]
    return generate_latest(registry)
