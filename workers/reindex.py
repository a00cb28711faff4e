"""Re-index every stored instance with a new model version, in the background, then switch at once.

While the job runs the old version keeps answering every query; the new one is built beside it
(its own code slots, its own embeddings, state ``building``), and new arrivals are written for both
(:func:`workers.tasks.target_versions`). When every instance is done, one SET of ``ns:model:active``
switches all readers (the replica indexes reload on a version change).

Job state, in Redis (the status page and ``drh-pacs status`` show it):

===========================  =====  ===========================================================
``ns:reindex``               hash   version, path, previous, state (planning|running|finishing|
                                    complete|failed), started, finished, total, done, failed,
                                    planned (1 once every batch is queued), studies_done
``ns:reindex:done``          set    SOPInstanceUIDs re-encoded (a set: a redelivered batch cannot
                                    count twice)
``ns:reindex:failed``        hash   SOPInstanceUID -> reason (file gone, decode error...)
===========================  =====  ===========================================================

Tasks (queue ``maintenance``): ``drh.reindex_plan`` lists the indexed instances and queues
``drh.reindex_batch`` of ``batch_size`` UIDs each; the batch that completes the count queues
``drh.reindex_finish``, which sweeps up instances indexed while planning ran, pools every study with
the new model, marks the version complete and activates it. Every step is idempotent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import Celery

from workers.model import ModelTask

ACTIVE_STATES = {"planning", "running", "finishing"}


def job_key(ns: str) -> str:
    return f"{ns}:reindex"


def _done_key(ns: str) -> str:
    return f"{ns}:reindex:done"


def _failed_key(ns: str) -> str:
    return f"{ns}:reindex:failed"


def register(app: Celery) -> None:
    opts: dict[str, Any] = {"base": ModelTask, "bind": True, "acks_late": True, "max_retries": None}
    app.task(name="drh.reindex_plan", **opts)(reindex_plan)
    app.task(name="drh.reindex_batch", **opts)(reindex_batch)
    app.task(name="drh.reindex_finish", **opts)(reindex_finish)


def _store(task: Any) -> Any:
    from workers.tasks import _store as store_of

    return store_of(task)


def _indexed_instances(r: redis.Redis, ns: str) -> list[tuple[str, str]]:
    """(sop_uid, study_uid) of every instance in state indexed."""
    prefix = f"{ns}:instance:"
    keys = list(r.scan_iter(match=prefix + "*", count=2000))
    out = []
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        pipe = r.pipeline()
        for k in chunk:
            pipe.hmget(k, "state", "study_uid")
        for k, (state, study) in zip(chunk, pipe.execute(), strict=True):
            if state == b"indexed":
                out.append((k.decode()[len(prefix) :], (study or b"").decode()))
    return out


def _job(r: redis.Redis, ns: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(job_key(ns)).items()}


def reindex_plan(self: ModelTask, version: str) -> int:
    """Queue every indexed instance for the new version; returns how many."""
    store = _store(self)
    r, ns = store.r, store.keys.ns
    job = _job(r, ns)
    if job.get("version") != version or job.get("state") not in ACTIVE_STATES:
        return 0
    r.hset(job_key(ns), "state", "running")  # from here on, new arrivals are written for both
    sops = [s for s, _ in _indexed_instances(r, ns)]
    size = max(1, self.app.drh_settings.batch_size)
    r.hset(job_key(ns), mapping={"total": len(sops)})
    for start in range(0, len(sops), size):
        self.app.send_task(
            "drh.reindex_batch", kwargs={"version": version, "sops": sops[start : start + size]}, queue="maintenance"
        )
    r.hset(job_key(ns), "planned", 1)
    _maybe_finish(self.app, r, ns, version)
    return len(sops)


def _maybe_finish(app: Celery, r: redis.Redis, ns: str, version: str) -> None:
    job = _job(r, ns)
    if job.get("planned") != "1" or job.get("state") != "running":
        return
    if r.scard(_done_key(ns)) + r.hlen(_failed_key(ns)) >= int(job.get("total", 0)):
        # HSETNX-like guard so that only one batch queues the finish step
        if r.hsetnx(job_key(ns), "finish_queued", 1):
            app.send_task("drh.reindex_finish", kwargs={"version": version}, queue="maintenance")


def _encode_and_store(task: ModelTask, store: Any, version: str, sops: list[str]) -> None:
    from workers.tasks import Item, PermanentError, TransientError, encoder_for_version, load_item

    settings = task.app.drh_settings
    r, ns = store.r, store.keys.ns
    enc = encoder_for_version(task, store, version)
    items = []
    for sop in sops:
        info = store.instance(sop)
        if info.get("state") != "indexed":
            r.sadd(_done_key(ns), sop)  # deleted or no longer an image: nothing to carry over
            continue
        it = Item(sop, info.get("study_uid", ""), info.get("path", ""), info.get("source_ae", ""), 0.0)
        try:
            not_image = load_item(settings, it)
        except TransientError:
            raise
        except PermanentError as exc:
            r.hset(_failed_key(ns), sop, str(exc))
            continue
        if not_image:
            r.hset(_failed_key(ns), sop, f"not an image: {not_image}")
            continue
        items.append(it)
    if items:
        codes, emb = enc.encode_images([it.pixels for it in items], batch_size=settings.batch_size)
        for n, it in enumerate(items):
            store.upsert_code(version, "image", it.sop_uid, codes[n], study_uid=it.study_uid)
            store.put_embedding(version, it.sop_uid, emb[n])
            r.sadd(_done_key(ns), it.sop_uid)
    for it in items:
        if it.local_copy:
            Path(it.local_copy).unlink(missing_ok=True)


def reindex_batch(self: ModelTask, version: str, sops: list[str]) -> int:
    """Re-encode some instances with the new version (idempotent: upserts and a set of done UIDs)."""
    from workers.tasks import TransientError, backoff

    store = _store(self)
    r, ns = store.r, store.keys.ns
    job = _job(r, ns)
    if job.get("version") != version or job.get("state") not in ACTIVE_STATES:
        return 0
    from workers.tasks import _hold

    _hold(self.app.drh_settings, "reindex_batch")
    try:
        _encode_and_store(self, store, version, sops)
    except (TransientError, redis.exceptions.ConnectionError) as exc:
        retries = self.request.retries or 0
        if retries >= self.app.drh_settings.task_max_retries:
            for sop in sops:
                if not r.sismember(_done_key(ns), sop):
                    r.hset(_failed_key(ns), sop, f"transient error persisted: {exc}")
        else:
            raise self.retry(exc=exc, countdown=backoff(retries)) from exc
    r.hset(job_key(ns), mapping={"done": r.scard(_done_key(ns)), "failed": r.hlen(_failed_key(ns))})
    _maybe_finish(self.app, r, ns, version)
    return len(sops)


def reindex_finish(self: ModelTask, version: str) -> str:
    """Sweep stragglers, pool every study with the new model, then switch the active version."""
    store = _store(self)
    r, ns = store.r, store.keys.ns
    job = _job(r, ns)
    if job.get("version") != version or job.get("state") not in ACTIVE_STATES:
        return "not running"
    r.hset(job_key(ns), "state", "finishing")
    done = {m.decode() for m in r.smembers(_done_key(ns))}
    failed = {m.decode() for m in r.hkeys(_failed_key(ns))}
    have = {m.decode() for m in r.hkeys(store.keys.slot(version, "image"))}
    instances = _indexed_instances(r, ns)
    missing = [s for s, _ in instances if s not in have and s not in failed and s not in done]
    size = max(1, self.app.drh_settings.batch_size)
    for start in range(0, len(missing), size):
        _encode_and_store(self, store, version, missing[start : start + size])
    from workers.tasks import encoder_for_version

    enc = encoder_for_version(self, store, version)
    studies = sorted({study for _, study in instances if study})
    for n, study in enumerate(studies, start=1):
        embs = store.get_embeddings(version, store.study_instances(study))
        if embs:
            bag = np.stack([embs[s] for s in sorted(embs)]).astype(np.float32)
            store.upsert_code(version, "study", study, enc.encode_study(bag))
        if n % 100 == 0:
            r.hset(job_key(ns), "studies_done", n)
    store.set_model_state(version, "complete")
    store.activate(version)
    r.hset(
        job_key(ns),
        mapping={
            "state": "complete",
            "finished": time.time(),
            "studies_done": len(studies),
            "done": r.scard(_done_key(ns)),
            "failed": r.hlen(_failed_key(ns)),
        },
    )
    return "complete"


def start(app: Celery, model_path: str, *, force: bool = False) -> dict[str, str]:
    """Register the new version and queue the plan; returns the job. Loads the checkpoint here once
    to learn its version and code length (and to fail now, not in every worker, if it is broken)."""
    from hashing.encoder import Encoder
    from plugin.store import CodeStore
    from workers.app import redis_for

    settings = app.drh_settings  # type: ignore[attr-defined]
    r = redis_for(app)
    ns = settings.redis_namespace
    store = CodeStore(r, ns)
    job = _job(r, ns)
    if job.get("state") in ACTIVE_STATES and not force:
        raise RuntimeError(f"a re-index to {job.get('version')} is already {job['state']} (use --force to restart)")
    # Workers find the checkpoint by this path: make it absolute (the same path on every worker).
    model_path = str(Path(model_path).resolve()) if model_path else ""
    enc = Encoder.load(model_path or None, device="cpu")
    if enc.version == store.active_version():
        raise RuntimeError(f"model {enc.version} is already the active version")
    store.register_model(enc.version, enc.nbits, path=model_path, emb_dim=enc.emb_dim)
    store.set_model_state(enc.version, "building")
    pipe = r.pipeline()
    pipe.delete(job_key(ns), _done_key(ns), _failed_key(ns))
    pipe.hset(
        job_key(ns),
        mapping={
            "version": enc.version,
            "path": model_path,
            "previous": store.active_version() or "",
            "state": "planning",
            "started": time.time(),
            "total": 0,
            "done": 0,
            "failed": 0,
            "planned": 0,
        },
    )
    pipe.execute()
    app.send_task("drh.reindex_plan", kwargs={"version": enc.version}, queue="maintenance")
    return _job(r, ns)


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs reindex MODEL_PATH [--wait]`` or ``drh-pacs reindex --status``."""
    from plugin.settings import SettingsError, load_settings
    from workers.app import make_celery, redis_for

    parser = argparse.ArgumentParser(prog="drh-pacs reindex", description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", help="checkpoint of the new model version")
    parser.add_argument("--shipped", action="store_true", help="re-index to the model shipped with the package")
    parser.add_argument("--status", action="store_true", help="show the progress of the current job")
    parser.add_argument("--wait", action="store_true", help="follow the job with a progress bar until it ends")
    parser.add_argument("--force", action="store_true", help="restart even if a job is running")
    args = parser.parse_args(argv)
    try:
        app = make_celery(load_settings())
    except (SettingsError, RuntimeError) as exc:
        print(f"drh-pacs reindex: {exc}", file=sys.stderr)
        return 2
    r = redis_for(app)
    ns = app.drh_settings.redis_namespace
    if args.model or args.shipped:
        try:
            job = start(app, "" if args.shipped else args.model, force=args.force)
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"drh-pacs reindex: {exc}", file=sys.stderr)
            return 1
        print(f"re-index to {job['version']} queued; {job['previous'] or '(none)'} answers until it completes")
    elif not args.status:
        parser.error("give a model checkpoint, --shipped, or --status")
    job = _job(r, ns)
    if not job:
        print("no re-index job")
        return 0
    if not args.wait:
        print(_describe(job))
        return 0 if job.get("state") != "failed" else 1
    from tqdm import tqdm

    with tqdm(total=int(job.get("total", 0)) or None, unit="img", desc=f"re-index {job['version']}") as bar:
        while job.get("state") in ACTIVE_STATES:
            total = int(job.get("total", 0))
            if total and bar.total != total:
                bar.total = total
            bar.n = int(job.get("done", 0)) + int(job.get("failed", 0))
            bar.set_postfix_str(job.get("state", ""))
            bar.refresh()
            time.sleep(1.0)
            job = _job(r, ns)
        bar.n = int(job.get("done", 0)) + int(job.get("failed", 0))
        bar.refresh()
    print(_describe(job))
    return 0 if job.get("state") == "complete" else 1


def _describe(job: dict[str, str]) -> str:
    return (
        f"re-index to {job.get('version')}: {job.get('state')}, {job.get('done', 0)}/{job.get('total', 0)} instances,"
        f" {job.get('failed', 0)} failed, studies pooled {job.get('studies_done', 0)}"
        f" (previous version {job.get('previous') or '(none)'})"
    )
