"""The Celery tasks that index: one instance (batched for the model, :mod:`workers.batching`), one study (DMIH).

Thin on purpose (Celery's guide): they take UIDs, not objects; their retry policy is declared on the
task class (``autoretry_for``, exponential ``retry_backoff`` with full jitter, ``max_retries`` from
``Settings.task_max_retries``); what outlives its retries is written to the failure ledger by the
class's ``on_failure`` hook, so no failure ends silently.

Idempotency (late acknowledgement redelivers a task whose worker died, possibly after it wrote):

- ``drh.index_instance`` is keyed by SOP Instance UID and the time the SCP received it. When the
  instance record already says ``indexed_received_at >= received_at`` for the target model
  versions, the task only cleans up and returns. Writes are upserts by UID (same slot, same code),
  so a task killed halfway and run again ends in the same state as one that ran once.
- ``drh.pool_study`` recomputes the study code from the stored embeddings; running it twice writes
  the same code into the same slot.

Study pooling is not scheduled with a countdown (an ETA message sits unacknowledged in one worker,
and waited for the visibility timeout, an hour, when that worker died). An indexed instance makes
its study due in Redis (:meth:`plugin.store.ingest.IngestState.pool_due`); every worker that takes
the ``study`` queue scans for due studies (:func:`scan_due_studies`, from its main process) and
sends one ``drh.pool_study`` per claimed study, under a lease: if the worker dies the study is due
again when the lease ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import redis
from celery import Celery

from workers import batching
from workers.batching import Item, TransientError
from workers.client import INDEX_INSTANCE, POOL_STUDY, store_for
from workers.model import ModelTask, ModelUnavailable
from workers.volumes import encode_volumes

log = logging.getLogger("drh.workers.tasks")

# Worth a retry with back-off: the failure is in something that comes back (Redis, the API, a
# checkpoint being deployed), not in the instance.
RETRY_ON = (TransientError, ModelUnavailable, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# First retry after up to 5 s, doubling up to 10 minutes; full jitter spreads a burst of retries.
RETRY_BACKOFF_SECONDS = 5
RETRY_BACKOFF_MAX_SECONDS = 600
# How often a worker's main process looks for studies due for pooling.
POOL_SCAN_SECONDS = 2.0
# Studies claimed per scan (the rest wait for the next one, two seconds later).
POOL_CLAIM_LIMIT = 100
# A study whose pooling failed for good is tried again after this long.
POOL_FAILURE_RETRY_SECONDS = 900.0


def pool_lease_seconds(stable_seconds: float) -> float:
    """How long a claimed study waits for its pooling before it is due again: a pooling takes
    seconds; the lease also covers the wait in the ``study`` queue, and stays within the stability
    window plus half a minute, so a study claimed just before a crash is searchable within
    2 x study_stable_seconds + 60 s of its last instance."""
    return max(30.0, stable_seconds) + 30.0


class RetryingTask(ModelTask):
    """The declared retry policy of every indexing task."""

    abstract = True
    autoretry_for = RETRY_ON
    retry_backoff = RETRY_BACKOFF_SECONDS
    retry_backoff_max = RETRY_BACKOFF_MAX_SECONDS
    retry_jitter = True

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        log.warning("%s %s: %s; retry %d", self.name, _subject(kwargs), exc, (self.request.retries or 0) + 1)
        self._count("retried")

    def _count(self, outcome: str) -> None:
        try:
            self.store.stats.count_task(self.name.removeprefix("drh."), outcome)
        except redis.exceptions.RedisError:
            pass


class IndexInstanceTask(RetryingTask):
    abstract = True

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Never lose an instance silently: it goes to the ledger (retryable once fixed); if even
        that fails (Redis down), the SCP's reconciler re-queues it from the spool."""
        item = Item.from_payload({**kwargs, "received_at": kwargs.get("received_at", 0.0)})
        if isinstance(exc, RETRY_ON):
            kind, reason = "transient", f"transient error persisted after {self.request.retries or 0} retries: {exc}"
        else:
            kind, reason = "error", f"internal error: {exc.__class__.__name__}: {exc}"[:500]
        log.error("instance %s failed (%s): %s", item.sop_uid, kind, reason)
        try:
            batching.record_failure(self.store, item, reason, kind)
        except redis.exceptions.RedisError as err:
            log.error(
                "instance %s: the failure could not be recorded (%s); the reconciler will re-queue it",
                item.sop_uid,
                err,
            )


class PoolStudyTask(RetryingTask):
    abstract = True

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Counted, logged, and tried again later: the study stays leased for
        :data:`POOL_FAILURE_RETRY_SECONDS`, then the scan claims it again."""
        study_uid = kwargs.get("study_uid", "")
        log.error(
            "study %s pooling failed after %d retries: %s; trying again in %.0f s",
            study_uid,
            self.request.retries or 0,
            exc,
            POOL_FAILURE_RETRY_SECONDS,
        )
        self._count("failed")
        try:
            self.store.ingest.pool_retry_later(study_uid, time.time() + POOL_FAILURE_RETRY_SECONDS)
        except redis.exceptions.RedisError:
            pass  # its lease ends anyway: the scan claims it again


def _subject(kwargs: dict[str, Any]) -> str:
    return str(kwargs.get("sop_uid") or kwargs.get("study_uid") or kwargs.get("version") or "")


def register(app: Celery) -> None:
    """Register the indexing tasks on ``app`` (each app carries its own settings, see
    :func:`workers.client.make_celery`)."""
    retries = app.drh_settings.task_max_retries  # type: ignore[attr-defined]
    # shared=False: each app gets its own task objects with its own settings (a process may hold several apps).
    opts: dict[str, Any] = {"bind": True, "acks_late": True, "max_retries": retries, "shared": False}
    app.task(name=INDEX_INSTANCE, base=IndexInstanceTask, **opts)(index_instance)
    app.task(name=POOL_STUDY, base=PoolStudyTask, **opts)(pool_study)


def index_instance(
    self: IndexInstanceTask,
    sop_uid: str,
    study_uid: str,
    path: str,
    source_ae: str = "",
    received_at: float = 0.0,
    **_: Any,
) -> str:
    """Index one received instance, batched with other pending ones; returns the outcome."""
    settings = self.app.drh_settings
    store = self.store
    own = Item(sop_uid, study_uid, path, source_ae, float(received_at), own=True)
    router = self.router()
    if batching.already_settled(store, own):
        store.ingest.done(sop_uid, study_uid)
        store.ingest.release([sop_uid])
        # The first run may have died between its writes and scheduling the study pooling.
        if batching.pooled_before_indexed(store, own):
            schedule_pooling(self.app, study_uid)
        store.stats.count_task("index_instance", "duplicate")
        return "duplicate"

    now = time.time()
    claim = store.ingest.claim(
        sop_uid, settings.batch_size - 1, now, now + settings.batch_claim_seconds, self.request.id or ""
    )
    if claim.busy_until is not None:
        # Another task is hashing this instance right now: come back when its lease ends. The new
        # message is published before this one is acknowledged, so nothing can be lost here.
        self.apply_async(kwargs=own.payload(), countdown=max(1.0, claim.busy_until - now + 1.0))
        store.stats.count_task("index_instance", "deferred")
        return "deferred"
    items = [own] + [Item.from_payload(p) for p in claim.payloads if p and p["sop_uid"] != sop_uid]
    try:
        outcome, studies = batching.index_batch(settings, store, router, items)
    finally:
        store.ingest.release([it.sop_uid for it in items])
        for it in items:
            it.forget_local_copy()
    for study in sorted(studies):
        schedule_pooling(self.app, study)
    return outcome


def schedule_pooling(app: Celery, study_uid: str) -> None:
    """Make the study due for pooling once it is stable: ``study_stable_seconds`` after its last
    instance's arrival. Idempotent, and a late instance only moves the time later."""
    settings = app.drh_settings  # type: ignore[attr-defined]
    store = store_for(app)
    last = float(store.records.study(study_uid).get("last_instance_at", "0") or 0) or time.time()
    store.ingest.pool_due(study_uid, last + settings.study_stable_seconds)


def scan_due_studies(app: Celery, now: float | None = None) -> int:
    """Claim the studies due for pooling and send one ``drh.pool_study`` each; returns how many.

    Run by every worker that takes the ``study`` queue, from its main process (:mod:`workers.app`):
    no beat process to keep alive, no message held for an hour by a dead worker. The claim is one
    script, so concurrent scanners never send the same study twice; a message that is lost (the
    broker down, the worker killed) leaves the study leased, due again when the lease ends.
    """
    settings = app.drh_settings  # type: ignore[attr-defined]
    now = time.time() if now is None else now
    lease = pool_lease_seconds(settings.study_stable_seconds)
    claimed = store_for(app).ingest.claim_due_studies(now, lease, POOL_CLAIM_LIMIT)
    for study_uid in claimed:
        app.send_task(POOL_STUDY, kwargs={"study_uid": study_uid}, queue="study")
    return len(claimed)


def pool_study(self: PoolStudyTask, study_uid: str, version: str = "") -> str:
    """Compute the DMIH study code of a stable study; a study made unstable again by a late instance,
    or with instances still queued for the model, is left to the scan, which claims it when it is
    due."""
    settings = self.app.drh_settings
    store = self.store
    last = float(store.records.study(study_uid).get("last_instance_at", "0") or 0)
    now = time.time()
    if not version and last + settings.study_stable_seconds - now > 0.05:
        store.ingest.pool_due(study_uid, last + settings.study_stable_seconds)
        store.ingest.pool_finished(study_uid)
        store.stats.count_task("pool_study", "deferred")
        return "deferred"
    queued, latest = store.ingest.queued_in_study(study_uid) if not version else (0, 0.0)
    if queued and latest + settings.study_queue_wait_seconds > now:
        # Instances still on their way to the model: the study is not complete yet. Looked at again
        # a stable period on (the last of them to be indexed also makes it due).
        store.ingest.pool_due(study_uid, now + max(settings.study_stable_seconds, 1.0))
        store.ingest.pool_finished(study_uid)
        store.stats.count_task("pool_study", "waiting")
        return "waiting"
    if queued:
        store.stats.count_task("pool_study", "without-queued")
        log.warning(
            "study %s pooled without %d queued instance(s): none arrived in the last %.0f s",
            study_uid, queued, settings.study_queue_wait_seconds,
        )  # fmt: skip
    versions = [(version, self.encoder_for_version(version))] if version else self.pool_versions()
    started = time.time()
    sops = store.records.study_instances(study_uid)
    outcome = "empty"
    for v, enc in versions:
        encode_volumes(settings, store, enc, v, study_uid)  # a bounded sample of each volume series
        if pool_one(store, enc, v, study_uid, sops, started):
            outcome = "pooled"
    if not version:
        store.ingest.pool_finished(study_uid)
    store.stats.count_task("pool_study", "done")
    log.info("study %s pooled over %d instance(s)", study_uid, len(sops))
    return outcome


def pool_one(store: Any, enc: Any, version: str, study_uid: str, sops: list[str], started: float) -> bool:
    """The study code and the series codes of one version from its instances' stored embeddings
    (DMIH pools each bag, the study's and each series', with the same layer); a series whose images
    left the version loses its code, and so does a study none of whose images the version holds
    (False, then)."""
    embs = store.embeddings.get_many(version, sops)
    series: dict[str, list[str]] = {}
    for sop, rec in zip(sops, store.records.instances(sops), strict=True):
        if rec.get("series_uid"):
            series.setdefault(rec["series_uid"], []).append(sop)
    pooled = []
    for series_uid, members in sorted(series.items()):
        bag = [embs[s] for s in sorted(members) if s in embs]
        if bag:
            code, rerank = enc.encode_study(np.stack(bag).astype(np.float32))
            store.codes.upsert(version, "series", series_uid, code, study_uid=study_uid, rerank=rerank)
            pooled.append(series_uid)
        else:
            store.codes.delete(version, "series", series_uid)
    store.records.link_series(study_uid, pooled)
    if not embs:
        store.codes.delete(version, "study", study_uid)
        return False
    bag = np.stack([embs[s] for s in sorted(embs)]).astype(np.float32)
    code, rerank = enc.encode_study(bag)
    store.codes.upsert(version, "study", study_uid, code, rerank=rerank)
    store.records.record_pooling(study_uid, version, len(embs), started, time.time())
    return True
