"""Re-index what a route holds with a new model version, in the background, then switch at once.

A new version serves one route (:class:`hashing.route.Route`). The job re-encodes every stored
image that the route will take once the version answers: the images its previous version held, and,
for a route that is new or wider, images another route (often the general model) or no model held
until now. While the job runs the previous versions keep answering; the new one is built beside
them (its own code slots, its own embeddings, state ``building``), and new arrivals it will take are
written for it too (:class:`workers.model.Router`). When every image is done, one HSET of the
route's version switches all readers (the replicas reload on a version change); images that came
from another route leave that route's index (their codes there are removed, its study codes
re-pooled), so answers never mix anatomies. The job's state lives in :mod:`plugin.store.reindex`;
``drh-pacs reindex`` and ``drh-pacs register`` (:mod:`plugin.ops.reindex`) start it.

Tasks (queue ``maintenance``): ``drh.reindex_plan`` lists the indexed instances and queues
``drh.reindex_batch`` of ``batch_size`` UIDs each; the batch that completes the count queues
``drh.reindex_finish``, which sweeps up instances indexed while planning ran, pools every study with
the new model, marks the version complete and activates it. Every step is idempotent, and their
retries are declared like the indexing tasks' (:class:`workers.tasks.RetryingTask`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from hashing.route import Route, first_match
from plugin.core.header import recorded_routing
from plugin.store import ACTIVE_STATES, Store
from workers import batching
from workers.batching import Item, PermanentError
from workers.client import REINDEX_BATCH, REINDEX_FINISH, REINDEX_PLAN, send
from workers.tasks import RetryingTask, pool_one
from workers.volumes import encode_volumes

log = logging.getLogger(__name__)


class ReindexBatchTask(RetryingTask):
    abstract = True

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """A batch that outlived its retries: its instances are listed as failed, the job goes on."""
        store = self.store
        for sop in kwargs.get("sops", []):
            if not store.reindex.is_done(sop):
                _failed(store, kwargs.get("version", ""), sop, f"transient error persisted: {exc}", "transient")
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


# Instance states a re-index takes from: indexed by some version, stored waiting for a model, or a
# slice of a volume series (encoded, if in its series' sample, when the job pools the study).
_TAKEN_STATES = ("indexed", "no-model", "volume-slice")
_HEADER_FIELDS = (
    "study_uid", "modality", "body_part", "route_body_part", "photometric", "indexed_version", "route", "volume"
)  # fmt: skip


def members(store: Store, settings: Any, version: str) -> list[tuple[str, dict[str, str]]]:
    """(sop_uid, record) of the stored images the route of ``version`` takes once it answers: the
    first route that matches each image's header, among the routes answering then."""
    target = store.models.route_of(version)
    after = store.models.matching(settings.unrouted, replacing=target)
    out = []
    for sop, rec in store.records.instances_in_states(_TAKEN_STATES, _HEADER_FIELDS):
        if first_match(after, *recorded_routing(rec)) == target:
            out.append((sop, rec))
    return out


def reindex_plan(self: RetryingTask, version: str) -> int:
    """Queue every stored image the new version's route takes; returns how many."""
    store = self.store
    if not _active_job(store, version):
        return 0
    store.reindex.update({"state": "running"})  # from here on, new arrivals are written for both
    taken = members(store, self.app.drh_settings, version)
    if store.reindex.get().get("mode") == "resort":  # the answering version: only what another route holds
        route = store.models.route_of(version).name
        taken = [(s, rec) for s, rec in taken if store.models.route_held(rec) != route]
    sops = [s for s, _ in taken]
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


def _failed(store: Store, version: str, sop: str, reason: str, kind: str = "permanent") -> None:
    """An instance the job could not re-encode: counted in the job, and in the failure ledger with
    its reason, so that it does not go missing from the new version's answers unseen (``drh-pacs
    failures`` lists it, monitoring counts it, ``failures retry`` indexes it again)."""
    store.reindex.mark_failed(sop, reason)
    info = store.records.instance(sop)
    payload = {
        "sop_uid": sop,
        "study_uid": info.get("study_uid", ""),
        "path": info.get("path", ""),
        "source_ae": info.get("source_ae", ""),
        "received_at": float(info.get("received_at") or 0),
    }
    store.ledger.record(payload, f"re-index to {version}: {reason}", kind=kind)
    log.error("instance %s not re-encoded for %s: %s", sop, version, reason)


def _progress(store: Store) -> None:
    done, failed = store.reindex.counts()
    store.reindex.update({"done": done, "failed": failed})


def encode_and_store(task: RetryingTask, version: str, sops: list[str]) -> None:
    """Re-encode instances from their files with ``version``; a transient error propagates (retried).
    A slice of a volume series is not encoded here: the job's end samples its series
    (:func:`workers.volumes.encode_volumes`), so a series costs a bounded number of passes."""
    settings = task.app.drh_settings
    store = task.store
    enc = task.encoder_for_version(version)
    items = []
    for sop in sops:
        info = store.records.instance(sop)
        if info.get("state") not in _TAKEN_STATES or info.get("volume") == "1":
            store.reindex.mark_done([sop])  # deleted, no longer an image, or a slice: nothing to encode now
            continue
        it = Item(sop, info.get("study_uid", ""), info.get("path", ""), info.get("source_ae", ""), 0.0)
        try:
            not_image = batching.load_guarded(settings, store, it, defer_volume=True)
        except PermanentError as exc:
            _failed(store, version, sop, str(exc))
            continue
        if not_image:
            _failed(store, version, sop, f"not an image: {not_image}")
            continue
        if it.volume:  # a slice indexed on its own before volumes were sampled: a slice from now on
            store.records.update_instance(sop, {"volume": "1"})
            store.reindex.mark_done([sop])
            it.forget_local_copy()
            continue
        items.append(it)
    try:
        if items:
            out = batching.encode_on_device(enc, [it.pixels for it in items], settings.batch_size)
            for n, it in enumerate(items):
                store.codes.upsert(
                    version, "image", it.sop_uid, out.codes[n], study_uid=it.study_uid, rerank=out.rerank[n]
                )
                store.embeddings.put(version, it.sop_uid, out.embeddings[n], out.variants[n])
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


# A re-index whose failures pass this share of its instances does not switch (they would be missing
# from every answer of the new version).
MAX_FAILED_FRACTION = 0.01


def reindex_finish(self: RetryingTask, version: str) -> str:
    """Sweep stragglers, pool the route's studies with the new model, switch the route's version,
    then take the images that came from other routes out of those routes."""
    store = self.store
    if not _active_job(store, version):
        return "not running"
    store.reindex.update({"state": "finishing"})
    taken = members(store, self.app.drh_settings, version)
    skip = store.reindex.done_uids() | store.reindex.failed_uids() | store.codes.uids(version, "image")
    missing = [s for s, _ in taken if s not in skip]
    size = max(1, self.app.drh_settings.batch_size)
    for start in range(0, len(missing), size):
        encode_and_store(self, version, missing[start : start + size])
    ok, failed = store.reindex.counts()
    if failed > MAX_FAILED_FRACTION * max(1, ok + failed):
        # Switching would answer without these images: the old version keeps answering, and the job
        # says why (`drh-pacs reindex --status`; each image's reason is kept with the job); fix the
        # cause and start it again.
        answering = store.models.active(store.models.route_of(version).name) or "(none)"
        reason = f"{failed} of {ok + failed} instances could not be re-encoded; {answering} keeps answering"
        fields = {"state": "failed", "finished": time.time(), "done": ok, "failed": failed, "reason": reason}
        store.reindex.update(fields)
        log.error("re-index to %s refused to switch: %s", version, reason)
        return "failed"
    enc = self.encoder_for_version(version)
    done = store.reindex.done_uids()
    moved = [(sop, rec) for sop, rec in taken if sop in done]
    studies = sorted({rec["study_uid"] for _, rec in moved if rec["study_uid"]})
    route = store.models.route_of(version)
    slices = _volume_slices(store, self.app.drh_settings, moved)
    for sop in slices:  # the route's slices now, for the sampling of their series below
        store.records.update_instance(sop, {"route": route.name})
    for n, study in enumerate(studies, start=1):
        encode_volumes(self.app.drh_settings, store, enc, version, study)  # its series' samples
        pool_one(store, enc, version, study, store.records.study_instances(study), time.time())
        if n % 100 == 0:
            store.reindex.update({"studies_done": n})
    previous = store.models.active(route.name)
    store.models.set_state(version, "complete")
    store.models.activate(version)
    _leave_other_routes(self, store, version, route, previous, moved, slices)
    ok, failed = store.reindex.counts()
    store.reindex.update(
        {"state": "complete", "finished": time.time(), "studies_done": len(studies), "done": ok, "failed": failed}
    )
    return "complete"


def _volume_slices(store: Store, settings: Any, moved: list[tuple[str, dict[str, str]]]) -> set[str]:
    """The moved images that are slices of a volume series (recorded so, or found so from their
    header while the job ran: a legacy slice), read in chunks from the few that can be."""
    volume_modalities = {m.upper() for m in settings.volume_modalities}
    maybe = [s for s, rec in moved if rec.get("volume") == "1" or rec["modality"].upper() in volume_modalities]
    out: set[str] = set()
    for start in range(0, len(maybe), 1000):
        chunk = maybe[start : start + 1000]
        out.update(s for s, now in zip(chunk, store.records.instances(chunk), strict=True) if now.get("volume") == "1")
    return out


def _leave_other_routes(
    task: RetryingTask,
    store: Store,
    version: str,
    route: Route,
    previous: str | None,
    moved: list,
    slices: set[str],
) -> None:
    """Images the new version took from other routes (or from no model) now belong to it: their
    records say so, their codes leave the other routes' versions (the previous version of this same
    route keeps its codes: a way back), and the studies they leave are pooled again there."""
    left: dict[str, set[str]] = {}
    for sop, rec in moved:
        old = rec.get("indexed_version", "")
        if rec["state"] == "no-model":
            store.stats.count_no_model(rec.get("modality") or "(none)", -1)
        fields = {"state": "indexed", "indexed_version": version, "route": route.name}
        if sop in slices and not store.codes.has(version, "image", sop):
            fields.update(state="volume-slice", indexed_version="")  # a slice outside its series' sample
        store.records.update_instance(sop, fields)
        if old and old != version and old != previous and store.models.details(old):
            store.codes.delete(old, "image", sop)
            store.embeddings.delete(old, [sop])
            left.setdefault(old, set()).add(rec["study_uid"])
    for old, studies in left.items():
        enc = task.encoder_for_version(old)
        for study in sorted(s for s in studies if s):
            pool_one(store, enc, old, study, store.records.study_instances(study), time.time())
