"""Counters that workers keep in Redis: task outcomes and the ingest latency histogram.

Workers are separate processes, often on other machines, so their counts cannot live in a
prometheus-client registry of one process: each increments counters here, and the API process
renders them (:mod:`plugin.ops.metrics`) with the live figures of :mod:`plugin.ops.status`.

``stats:tasks`` counts ``<task>:<outcome>`` (outcomes: done, failed, retried, ignored, duplicate,
deferred). ``stats:latency`` is the C-STORE-to-searchable histogram: ``le:<bound>`` -> count in that
bucket (not cumulative), ``sum``, ``count``, measured from the SCP's reception time to the moment the
code is in Redis (the query process's replica picks it up within its refresh period).
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import redis

from plugin.store.keys import Keys

# Seconds. From "as fast as one model batch" to "a re-index backlog".
LATENCY_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
# Every (task, outcome) the workers count (workers/tasks.py, workers/batching.py), reported from the
# start at zero: a counter that only appears with its first event hides that event from
# ``increase()``, so an alert on failures would miss the first burst.
TASK_OUTCOMES = {
    "index_instance": ("done", "failed", "retried", "ignored", "duplicate", "deferred", "no-model", "volume-slice"),
    "pool_study": ("done", "deferred", "waiting", "without-queued", "retried"),
}


# What becomes of an instance, counted per modality (plugin.ops.status shows them side by side).
MODALITY_OUTCOMES = ("indexed", "to-general", "failed", "ignored", "no-model")
# ("to-general": of the indexed, those the general model read although a specific route takes their
# modality, because their header named none of its body parts; hashing.route.fell_back.)


class Stats:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys

    def count_task(self, task: str, outcome: str, n: int = 1, pipe: redis.client.Pipeline | None = None) -> None:
        """Count one task outcome; never raises (metrics must not fail a task). With ``pipe``, queued
        on the caller's transaction, which stands or falls with it."""
        self._count(self.keys.stats_tasks(), f"{task}:{outcome}", n, pipe)

    def observe_latency(self, seconds: float) -> None:
        """Add one C-STORE-to-searchable latency to the histogram; never raises."""
        seconds = max(0.0, seconds)
        bound = next((b for b in LATENCY_BUCKETS if seconds <= b), float("inf"))
        key = self.keys.stats_latency()
        with suppress(redis.exceptions.RedisError):
            pipe = self.r.pipeline()
            pipe.hincrby(key, f"le:{bound}", 1)
            pipe.hincrbyfloat(key, "sum", seconds)
            pipe.hincrby(key, "count", 1)
            pipe.execute()

    def count_no_model(self, modality: str, n: int = 1) -> None:
        """Images stored without a model, per modality, now (a gauge: the re-index that gives them a
        model takes them off again)."""
        self.r.hincrby(self.keys.nomodel(), modality or "(none)", n)

    def count_modality(
        self, outcome: str, modality: str, n: int = 1, pipe: redis.client.Pipeline | None = None
    ) -> None:
        """Count an instance's outcome (indexed, failed, ignored, no-model) under its modality, so IT
        staff see which kind of image fails or waits; never raises. With ``pipe``, queued on the
        caller's transaction."""
        self._count(self.keys.bymodality(), f"{outcome}|{modality or '(none)'}", n, pipe)

    def _count(self, key: str, field: str, n: int, pipe: redis.client.Pipeline | None) -> None:
        """One counter: queued on ``pipe`` (the caller's transaction stands or falls with it), else
        written now, a failure swallowed (metrics must not fail a task)."""
        if pipe is not None:
            pipe.hincrby(key, field, n)
            return
        with suppress(redis.exceptions.RedisError):
            self.r.hincrby(key, field, n)

    def by_modality(self) -> dict[str, dict[str, int]]:
        """modality -> outcome -> instances, every outcome of :data:`MODALITY_OUTCOMES` present."""
        out: dict[str, dict[str, int]] = {}
        for k, v in self.r.hgetall(self.keys.bymodality()).items():
            outcome, _, modality = k.decode().partition("|")
            out.setdefault(modality, dict.fromkeys(MODALITY_OUTCOMES, 0))[outcome] = int(v)
        return out

    def no_model(self) -> dict[str, int]:
        """modality -> images stored and waiting for a model (no route takes them)."""
        return {k.decode(): int(v) for k, v in self.r.hgetall(self.keys.nomodel()).items() if int(v) > 0}

    def tasks(self) -> dict[str, dict[str, int]]:
        """task -> outcome -> count; the outcomes of :data:`TASK_OUTCOMES` are there at zero."""
        out: dict[str, dict[str, int]] = {task: dict.fromkeys(outcomes, 0) for task, outcomes in TASK_OUTCOMES.items()}
        for k, v in self.r.hgetall(self.keys.stats_tasks()).items():
            task, _, outcome = k.decode().partition(":")
            out.setdefault(task, {})[outcome] = int(v)
        return out

    def latency(self) -> dict[str, Any]:
        """{"buckets": [(bound, cumulative count)...], "sum", "count"} with +Inf last."""
        raw = {k.decode(): v.decode() for k, v in self.r.hgetall(self.keys.stats_latency()).items()}
        cumulative = 0
        buckets = []
        for bound in (*LATENCY_BUCKETS, float("inf")):
            cumulative += int(raw.get(f"le:{bound}", 0))
            buckets.append((bound, cumulative))
        return {"buckets": buckets, "sum": float(raw.get("sum", 0.0)), "count": int(raw.get("count", 0))}
