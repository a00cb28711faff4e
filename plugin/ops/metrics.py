"""Prometheus ``/metrics``: the figures of :func:`plugin.ops.status.gather` in the text exposition format.

Workers count in Redis (:mod:`plugin.store.stats`), since they are separate processes, often on
other machines; every scrape renders the same figures as the status page and ``drh-pacs status``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
    """The Prometheus text exposition of one :func:`plugin.ops.status.gather` result."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FiguresCollector(figures))  # type: ignore[arg-type]
    return generate_latest(registry)
