"""Re-index every stored instance with a new model version, in the background, then switch at once.

While the job runs the old version keeps answering every query; the new one is built beside it
(its own code slots, its own embeddings, state ``building``), and new arrivals are written for both
(:meth:`workers.model.ModelTask.target_versions`). When every instance is done, one SET of the active
version switches all readers (the replica indexes reload on a version change). The job's state lives
in :mod:`plugin.store.reindex`; ``drh-pacs reindex`` (:mod:`plugin.ops.reindex`) starts it.

Tasks (queue ``maintenance``): ``drh.reindex_plan`` lists the indexed instances and queues
``drh.reindex_batch`` of ``batch_size`` UIDs each; the batch that completes the count queues
``drh.reindex_finish``, which sweeps up instances indexed while planning ran, pools every study with
the new model, marks the version complete and activates it. Every step is idempotent, and their
retries are declared like the indexing tasks' (:class:`workers.tasks.RetryingTask`).
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from plugin.store import ACTIVE_STATES, Store
from workers import batching
from workers.batching import Item, PermanentError
from workers.client import REINDEX_BATCH, REINDEX_FINISH, REINDEX_PLAN, send
from workers.tasks import RetryingTask, pool_one


class ReindexBatchTask(RetryingTask):
    abstract = True

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A batch that outlived its retries: its instances are listed as failed, the job goes on."""
        store = self.store
        for sop in kwargs.get("sops", []):
            if not store.reindex.is_done(sop):
                store.reindex.mark_failed(sop, f"transient error persisted: {exc}")
        _progress(store)
        _maybe_finish(self.app, store, kwargs.get("version", ""))


def register(app: Celery) -> None:
    retries = app.drh_settings.task_max_retries  # type: ignore[attr-defined]
    opts: dict[str, Any] = {"bind": True, "acks_late": True, "max_retries": retries, "shared": False}
    app.task(name=REINDEX_PLAN, base=RetryingTask, **opts)(reindex_plan)
    app.task(name=REINDEX_BATCH, base=ReindexBatchTask, **opts)(reindex_batch)
    app.task(name=REINDEX_FINISH, base=RetryingTask, **opts)(reindex_finish)


def _active_job(store: Store, version: str) -> bool:
    job = store.reindex.get()
    return job.get("version") == version and job.get("state") in ACTIVE_STATES


def reindex_plan(self: RetryingTask, version: str) -> int:
    """Queue every indexed instance for the new version; returns how many."""
    store = self.store
    if not _active_job(store, version):
        return 0
    store.reindex.update({"state": "running"})  # from here on, new arrivals are written for both
    sops = [s for s, _ in store.records.instances_in_state("indexed")]
    size = max(1, self.app.drh_settings.batch_size)
    store.reindex.update({"total": len(sops)})
    for start in range(0, len(sops), size):
        send(self.app, REINDEX_BATCH, version=version, sops=sops[start : start + size])
    store.reindex.update({"planned": 1})
    _maybe_finish(self.app, store, version)
    return len(sops)


def _maybe_finish(app: Celery, store: Store, version: str) -> None:
    job = store.reindex.get()
    if job.get("planned") != "1" or job.get("state") != "running":
        return
    done, failed = store.reindex.counts()
    if done + failed >= int(job.get("total", 0)) and store.reindex.claim_finish():
        send(app, REINDEX_FINISH, version=version)


def _progress(store: Store) -> None:
    done, failed = store.reindex.counts()
    store.reindex.update({"done": done, "failed": failed})


def encode_and_store(task: RetryingTask, version: str, sops: list[str]) -> None:
    """Re-encode instances from their files with ``version``; a transient error propagates (retried)."""
    settings = task.app.drh_settings
    store = task.store
    enc = task.encoder_for_version(version)
    items = []
    for sop in sops:
        info = store.records.instance(sop)
        if info.get("state") != "indexed":
            store.reindex.mark_done([sop])  # deleted or no longer an image: nothing to carry over
            continue
        it = Item(sop, info.get("study_uid", ""), info.get("path", ""), info.get("source_ae", ""), 0.0)
        try:
            not_image = batching.load_item(settings, it)
        except PermanentError as exc:
            store.reindex.mark_failed(sop, str(exc))
            continue
        if not_image:
            store.reindex.mark_failed(sop, f"not an image: {not_image}")
            continue
        items.append(it)
    try:
        if items:
            out = enc.encode_images([it.pixels for it in items], batch_size=settings.batch_size)
            for n, it in enumerate(items):
                store.codes.upsert(
                    version, "image", it.sop_uid, out.codes[n], study_uid=it.study_uid, rerank=out.rerank[n]
                )
                store.embeddings.put(version, it.sop_uid, out.embeddings[n])
            store.reindex.mark_done(it.sop_uid for it in items)
    finally:
        for it in items:
            it.forget_local_copy()


def reindex_batch(self: ReindexBatchTask, version: str, sops: list[str]) -> int:
    """Re-encode some instances with the new version (idempotent: upserts and a set of done UIDs)."""
    store = self.store
    if not _active_job(store, version):
        return 0
    batching.hold(self.app.drh_settings, "reindex_batch")
    encode_and_store(self, version, sops)
    _progress(store)
    _maybe_finish(self.app, store, version)
    return len(sops)


def reindex_finish(self: RetryingTask, version: str) -> str:
    """Sweep stragglers, pool every study with the new model, then switch the active version."""
    store = self.store
    if not _active_job(store, version):
        return "not running"
    store.reindex.update({"state": "finishing"})
    skip = store.reindex.done_uids() | store.reindex.failed_uids() | store.codes.uids(version, "image")
    instances = store.records.instances_in_state("indexed")
    missing = [s for s, _ in instances if s not in skip]
    size = max(1, self.app.drh_settings.batch_size)
    for start in range(0, len(missing), size):
        encode_and_store(self, version, missing[start : start + size])
    enc = self.encoder_for_version(version)
    studies = sorted({study for _, study in instances if study})
    for n, study in enumerate(studies, start=1):
        pool_one(store, enc, version, study, store.records.study_instances(study), time.time())
        if n % 100 == 0:
            store.reindex.update({"studies_done": n})
    store.models.set_state(version, "complete")
    store.models.activate(version)
    done, failed = store.reindex.counts()
    store.reindex.update(
        {"state": "complete", "finished": time.time(), "studies_done": len(studies), "done": done, "failed": failed}
    )
    return "complete"
