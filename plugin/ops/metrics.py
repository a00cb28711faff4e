"""Prometheus ``/metrics``: the figures of :func:`plugin.ops.status.gather` in the text exposition format.

Workers count in Redis (:mod:`plugin.store.stats`), since they are separate processes, often on
other machines; the DICOM listener counts in its own process (:mod:`plugin.dicom.counters`); every
scrape renders the same figures as the status page and ``drh-pacs status``. Every counter is
exported from the start at zero (all task outcomes, every DIMSE service and outcome, every
rejection reason), so that ``increase()`` in an alert sees the first events too.
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


def _counter(name: str, doc: str, labels: list[str], counts: Any) -> CounterMetricFamily:
    """A counter family from ``(key, n)`` pairs: a key holds its label values joined by ``|``
    (``"C-MOVE|failed"``), as the SCP's counters keep them."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in counts:
        family.add_metric(key.split("|", len(labels) - 1), n)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    """A gauge family of one sample."""
    family = GaugeMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _dicom(d: dict[str, Any]) -> Any:
    """The SCP process's counters (plugin.dicom.counters): associations, rejections, DIMSE requests."""
    yield _counter("drh_dicom_associations", "DICOM associations by outcome", ["outcome"], d["associations"].items())
    yield _counter(
        "drh_dicom_association_rejections", "associations rejected, by reason", ["reason"], d["rejections"].items()
    )
    yield _counter(
        "drh_dicom_admission_refusals",
        "connections refused or associations aborted by admission control (pending, timeouts, sizes, slots), by reason",
        ["reason"],
        sorted(d.get("admission_refusals", {}).items()),
    )
    yield _gauge(
        "drh_spool_unqueued_files",
        "files safe in the spool whose queueing for the workers failed or is still to come (the broker was down)",
        d.get("spool_unqueued", 0),
    )
    yield _gauge("drh_dicom_active_associations", "DICOM associations open now", d["active_associations"])
    yield _counter(
        "drh_dicom_requests",
        "DIMSE requests answered, by service and outcome",
        ["operation", "outcome"],
        d["requests"].items(),
    )
    yield _counter(
        "drh_dicom_retrieve_suboperations",
        "C-STORE sub-operations of C-MOVE and C-GET sent from here, by what the destination answered",
        ["operation", "outcome"],
        d.get("suboperations", {}).items(),
    )
    yield _counter(
        "drh_dicom_move_forwards",
        "C-MOVEs forwarded to the PACS that sent the study, by what it answered",
        ["outcome"],
        d.get("move_forwards", {}).items(),
    )
    yield _counter(
        "drh_dicom_presentation_contexts_rejected",
        "SOP classes refused in accepted associations, once each (non-image: DRH_NON_IMAGE_POLICY=reject)",
        ["reason"],
        d.get("contexts_rejected", {}).items(),
    )
    duration = HistogramMetricFamily(
        "drh_dicom_request_duration_seconds",
        "time from a DIMSE request to its final response (C-MOVE and C-GET: all sub-operations)",
        labels=["operation"],
    )
    for operation, lat in d["latency"].items():
        buckets = [("+Inf" if b == float("inf") else repr(b), c) for b, c in lat["buckets"]]
        duration.add_metric([operation], buckets, sum_value=lat["sum"])
    yield duration


def _surroundings(f: dict[str, Any]) -> Any:
    """What the process sees around it: the spool's disk, Orthanc."""
    spool = f.get("spool")
    if spool and spool.get("ok"):
        yield _gauge("drh_spool_free_bytes", "free bytes on the file system of the DICOM spool", spool["free"])
        yield _gauge("drh_spool_size_bytes", "size in bytes of the file system of the DICOM spool", spool["total"])
    orthanc = f.get("orthanc")
    if orthanc:
        yield _gauge(
            "drh_orthanc_up",
            "1 when Orthanc's REST API answered drh-pacs (credentials accepted)",
            1.0 if orthanc["up"] else 0.0,
        )
        rec = orthanc.get("reconcile")
        if rec is not None:
            yield _gauge(
                "drh_orthanc_reconcile_last_success_timestamp_seconds",
                "when a reconciliation with Orthanc last succeeded (0: never)",
                rec["last_ok"],
            )


class _FiguresCollector:
    def __init__(self, figures: dict[str, Any]) -> None:
        self.f = figures

    def collect(self) -> Any:
        f = self.f
        yield _gauge(
            "drh_redis_up", "1 when Redis (store and broker) answered this scrape", 1.0 if f.get("redis_ok") else 0.0
        )
        if f.get("dicom"):
            yield from _dicom(f["dicom"])
        yield from _surroundings(f)
        if not f.get("redis_ok"):
            return
        depth = GaugeMetricFamily("drh_queue_depth", "messages waiting in a Celery queue", labels=["queue"])
        for name, n in f["queues"].items():
            depth.add_metric([name], n)
        yield depth
        yield _gauge("drh_tasks_in_flight", "messages delivered to workers, not yet acknowledged", f["in_flight"])
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
            "drh_index_codes",
            "codes stored per model version, level and route (active: the version answers for its route)",
            labels=["version", "level", "active", "route"],
        )
        for v in f["models"]:
            for level in ("image", "series", "study"):
                codes.add_metric([v["version"], level, "1" if v["active"] else "0", v["route"]], v[level])
        yield codes
        no_model = GaugeMetricFamily(
            "drh_no_model_instances",
            "images stored without a model (no route takes them, unrouted=none), per modality",
            labels=["modality"],
        )
        for modality, n in sorted((f.get("no_model") or {}).items()):
            no_model.add_metric([modality], n)
        yield no_model
        by_modality = CounterMetricFamily(
            "drh_instances_by_modality",
            "instances indexed, failed, ignored (non-images) or stored without a model, per modality",
            labels=["outcome", "modality"],
        )
        for modality, counts in sorted((f.get("by_modality") or {}).items()):
            for outcome, n in counts.items():
                by_modality.add_metric([outcome, modality], n)
        yield by_modality
        workers = GaugeMetricFamily(
            "drh_worker_processes", "Celery worker processes alive, by worker and device", labels=["worker", "device"]
        )
        worker_up = GaugeMetricFamily(
            "drh_worker_up",
            "1 when the worker is online; 0 when it stopped beating (offline) or refuses its unusable device",
            labels=["worker", "device"],
        )
        seen = GaugeMetricFamily(
            "drh_worker_last_seen_timestamp_seconds", "the worker's last heartbeat", labels=["worker"]
        )
        for w in f["workers"]:
            if w.get("state", "online") == "stopped":
                continue  # stopped on purpose: not a part that is down
            if w.get("state", "online") == "online":
                workers.add_metric([w["hostname"], w["device"]], w["concurrency"])
            worker_up.add_metric([w["hostname"], w["device"]], 1.0 if w.get("state", "online") == "online" else 0.0)
            seen.add_metric([w["hostname"]], float(w.get("last_seen", 0)))
        yield workers
        yield worker_up
        yield seen
        yield _gauge("drh_failed_instances", "instances in the failure ledger", f["failures"]["count"])
        yield _gauge(
            "drh_refused_instances", "C-STOREs refused at reception (malformed data)", f["failures"].get("refused", 0)
        )
        yield _gauge("drh_ignored_instances", "non-image objects accepted and not indexed", f["failures"]["ignored"])
        yield _gauge("drh_batch_pending", "instances queued for the model, not yet claimed", f["pending"])
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
