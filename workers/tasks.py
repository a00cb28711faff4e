"""The Celery tasks: index one instance (batched for the model), pool a study (DMIH).

Idempotency (late acknowledgement redelivers a task whose worker died, possibly after it wrote):

- ``drh.index_instance`` is keyed by SOP Instance UID and the time the SCP received it. When the
  instance hash already says ``indexed_received_at >= received_at`` for the active model version,
  the task only cleans up and returns. Writes are upserts by UID (same slot, same code), so a task
  killed halfway and run again ends in the same state as one that ran once.
- ``drh.pool_study`` recomputes the study code from the stored embeddings; running it twice writes
  the same code into the same slot.

Batching for the model (the GPU wants batches, Celery delivers one message per instance):
``enqueue_instance`` also records each instance in a Redis sorted set ``ns:ingest:pending``
(oldest first) with its payload in ``ns:ingest:payload``. A task holding the message of instance X
claims X plus up to ``batch_size - 1`` other pending instances in one Lua call (moving them to
``ns:ingest:claim`` with a lease deadline) and hashes them in one forward pass. The claimed
instances' own messages are still in the broker, untouched: when one is delivered it finds its
instance indexed and returns at once, or, if the claiming task is still running (lease live), it
re-queues itself for when the lease ends. If the claiming worker dies, its claims expire and the
instances' own messages index them. The set is only a hint: losing it costs batching, never data.

Outcomes of one instance: indexed; ignored (a non-image object, ``NotAnImage``: recorded, not a
failure); failed (a permanent decode error, or a transient one that persisted through every retry:
written to the failure ledger, :mod:`workers.failures`, from where IT staff retry it).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import Celery

from plugin import metrics
from plugin.dicom_meta import instance_meta, study_meta
from plugin.store import CodeStore
from workers.failures import FailureLedger
from workers.model import RANDOM_KEY, ModelTask, ModelUnavailable
from workers.reindex import job_key

log = logging.getLogger("drh.workers.tasks")

# Longest back-off between retries of a transient error, seconds.
MAX_BACKOFF_SECONDS = 600.0

# KEYS: pending (zset), payload (hash), claim (hash). ARGV: own uid, max others, now, lease deadline,
# claimer (the Celery task id). A claim is "deadline|claimer". Returns {status, ...}: status 1 =
# claimed (own payload, "" when the hint was lost, then the others' payloads), 0 = own instance
# under a live claim of another task (the second element is that claim's deadline). A claim made
# by the same task id is this very message delivered again after its worker died: taken over.
_CLAIM_LUA = """
local own = ARGV[1]
local now = tonumber(ARGV[3])
local me = ARGV[5]
local function live(c)
  if not c then return false end
  local deadline, who = string.match(c, '^([^|]+)|(.*)$')
  return tonumber(deadline) > now and who ~= me, deadline
end
local busy, deadline = live(redis.call('HGET', KEYS[3], own))
if busy then
  return {0, deadline}
end
local claim = ARGV[4] .. '|' .. me
local out = {1, redis.call('HGET', KEYS[2], own) or ''}
redis.call('ZREM', KEYS[1], own)
redis.call('HSET', KEYS[3], own, claim)
local n = tonumber(ARGV[2])
if n > 0 then
  local others = redis.call('ZRANGE', KEYS[1], 0, n - 1)
  for _, uid in ipairs(others) do
    redis.call('ZREM', KEYS[1], uid)
    local p = redis.call('HGET', KEYS[2], uid)
    if p and not live(redis.call('HGET', KEYS[3], uid)) then
      redis.call('HSET', KEYS[3], uid, claim)
      table.insert(out, p)
    end
  end
end
return out
"""

# KEYS: study hash, study instances set. ARGV: modality, received_at, then field/value pairs.
# Merges the modality into the comma-joined sorted set and keeps the latest arrival: concurrent
# workers on one study must not lose each other's updates.
_STUDY_LUA = """
local h = KEYS[1]
for i = 3, #ARGV, 2 do
  redis.call('HSET', h, ARGV[i], ARGV[i + 1])
end
local mods = {}
local seen = {}
local cur = redis.call('HGET', h, 'modalities') or ''
for m in string.gmatch(cur, '[^,]+') do
  if not seen[m] then seen[m] = true; table.insert(mods, m) end
end
if ARGV[1] ~= '' and not seen[ARGV[1]] then table.insert(mods, ARGV[1]) end
table.sort(mods)
redis.call('HSET', h, 'modalities', table.concat(mods, ','))
redis.call('HSET', h, 'n_instances', redis.call('SCARD', KEYS[2]))
local last = tonumber(redis.call('HGET', h, 'last_instance_at') or '0')
if tonumber(ARGV[2]) > last then
  redis.call('HSET', h, 'last_instance_at', ARGV[2])
end
return redis.call('HGET', h, 'last_instance_at')
"""


class TransientError(RuntimeError):
    """Worth retrying: Redis or the HTTP API briefly unreachable, a decode error flagged transient."""


class PermanentError(RuntimeError):
    """Retrying will not help until someone acts (a corrupt file, an unsupported encoding)."""


@dataclass
class Item:
    """One instance of a model batch."""

    sop_uid: str
    study_uid: str
    path: str
    source_ae: str
    received_at: float
    own: bool = False
    ds: Any = None
    pixels: np.ndarray | None = None
    local_copy: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return {
            "sop_uid": self.sop_uid,
            "study_uid": self.study_uid,
            "path": self.path,
            "source_ae": self.source_ae,
            "received_at": self.received_at,
        }


def _ns(app: Celery) -> str:
    return app.drh_settings.redis_namespace  # type: ignore[attr-defined]


def pending_key(ns: str) -> str:
    return f"{ns}:ingest:pending"


def payload_key(ns: str) -> str:
    return f"{ns}:ingest:payload"


def claim_key(ns: str) -> str:
    return f"{ns}:ingest:claim"


def decoding_key(ns: str) -> str:
    """Hash SOPInstanceUID -> decodes started and not finished: what a worker killed mid-decode leaves."""
    return f"{ns}:ingest:decoding"


# A file whose decoding killed the worker process this many times (a codec crashing hard on it) is
# recorded as a permanent failure instead of being redelivered, and crashing workers, for ever.
MAX_DECODE_CRASHES = 3


def pool_sched_key(ns: str, study_uid: str) -> str:
    return f"{ns}:pool:scheduled:{study_uid}"


def pending_hint(app: Celery, payload: dict[str, Any]) -> None:
    """Record an enqueued instance for batching (see the module docstring)."""
    from workers.app import redis_for

    ns = _ns(app)
    pipe = redis_for(app).pipeline()
    pipe.hset(payload_key(ns), payload["sop_uid"], json.dumps(payload))
    pipe.zadd(pending_key(ns), {payload["sop_uid"]: payload["received_at"]})
    pipe.execute()


def backoff(retries: int, base: float = 5.0) -> float:
    """Exponential back-off with jitter, capped: 5, 10, 20... seconds, +/- 25 %."""
    delay = min(MAX_BACKOFF_SECONDS, base * (2**retries))
    return delay * random.uniform(0.75, 1.25)


def _hold(settings: Any, stage: str) -> None:
    """Fault-injection hook for the fault tests: wait while ``<fault_hold_dir>/<stage>.hold`` exists.

    Inert unless ``Settings.fault_hold_dir`` is set. It lets a test kill a worker at a known point of
    a task (before or after the Redis writes) instead of hoping a sleep lands there.
    """
    if not settings.fault_hold_dir:
        return
    folder = Path(settings.fault_hold_dir)
    hold = folder / f"{stage}.hold"
    if not hold.exists():
        return
    (folder / f"{stage}.reached").write_text(str(os.getpid()))
    while hold.exists():
        time.sleep(0.05)


# -- model versions --------------------------------------------------------------------------


def target_versions(task: ModelTask, store: CodeStore) -> list[tuple[str, Any]]:
    """(version, encoder) pairs a new instance must be written for: the active model and, while a
    re-index runs, the new one too (so it is complete when it takes over)."""
    settings = task.app.drh_settings
    active = store.active_version()
    if active is None:
        enc = task.encoder(settings.model_path)
        store.register_model(enc.version, enc.nbits, path=settings.model_path, emb_dim=enc.emb_dim)
        if store.ensure_active(enc.version):
            store.set_model_state(enc.version, "complete")  # the first version is built as studies arrive
        active = store.active_version() or enc.version
    versions = [active]
    job = store.r.hgetall(job_key(store.keys.ns))
    if job.get(b"state", b"").decode() in {"planning", "running", "finishing"}:
        target = job[b"version"].decode()
        if target != active:
            versions.append(target)
    out = []
    for version in versions:
        out.append((version, encoder_for_version(task, store, version)))
    return out


def encoder_for_version(task: ModelTask, store: CodeStore, version: str) -> Any:
    """The encoder of a registered version, from the checkpoint path recorded with it."""
    settings = task.app.drh_settings
    raw = store.r.hget(store.keys.model(version), "path")
    path = raw.decode() if raw is not None else settings.model_path
    enc = task.encoder(path)
    if enc.version != version:
        from hashing.encoder import RANDOM_VERSION

        if version == RANDOM_VERSION:
            # The seeded placeholder used before trained weights shipped: reproducible at will, so
            # an installation started with it keeps working after a package upgrade.
            return task.encoder(RANDOM_KEY)
        raise ModelUnavailable(
            f"model {version} is registered with checkpoint {path or '(shipped default)'}, which holds"
            f" version {enc.version} on this worker: restore that checkpoint, or move to the new model"
            " with `drh-pacs reindex`"
        )
    return enc


# -- reading instances -----------------------------------------------------------------------


def _fetch(settings: Any, item: Item) -> str:
    """Download a spooled file from the plugin's HTTP API (a worker on another machine)."""
    url = f"{settings.api_url.rstrip('/')}/api/instances/{item.sop_uid}/file"
    token = settings.api_token
    if not token and (settings.data_dir / "api-token").exists():
        token = settings.resolved_api_token()  # a worker on the plugin's machine shares its data dir
    if not token:
        raise PermanentError("api_url is set but no API token: set DRH_API_TOKEN on this worker")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            fd, tmp = tempfile.mkstemp(suffix=".dcm", prefix="drh-fetch-")
            with os.fdopen(fd, "wb") as fh:
                while chunk := resp.read(1 << 20):
                    fh.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise PermanentError(f"file not on this worker and the API has none (404) for {item.sop_uid}") from exc
        if exc.code in (401, 403):
            raise PermanentError(f"the API refused this worker's token (HTTP {exc.code}): check DRH_API_TOKEN") from exc
        raise TransientError(f"fetching {item.sop_uid} over the API: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise TransientError(f"fetching {item.sop_uid} over the API: {exc}") from exc
    return tmp


def load_item(settings: Any, item: Item) -> str:
    """Read and decode one instance; returns "" or the reason it is not an image (to ignore).

    Raises TransientError / PermanentError for failures.
    """
    from hashing.preprocess import DecodeError, NotAnImage, load_pixels, read_dataset

    path = item.path
    if not os.path.exists(path):
        if not settings.api_url:
            raise PermanentError(f"file {path} is missing and no api_url is set to fetch it")
        path = item.local_copy = _fetch(settings, item)
    try:
        item.ds = read_dataset(path)
        item.pixels = load_pixels(item.ds)
    except NotAnImage as exc:
        return str(exc) or "not an image"
    except DecodeError as exc:
        if getattr(exc, "transient", False):
            raise TransientError(f"decode: {exc}") from exc
        raise PermanentError(f"decode: {exc}") from exc
    except OSError as exc:
        raise TransientError(f"reading {path}: {exc}") from exc
    return ""


# -- the tasks -------------------------------------------------------------------------------


def register(app: Celery) -> None:
    """Register the tasks on ``app`` (each app carries its own settings, see make_celery)."""
    from workers import reindex

    app.task(name="drh.index_instance", base=ModelTask, bind=True, acks_late=True, max_retries=None)(index_instance)
    app.task(name="drh.pool_study", base=ModelTask, bind=True, acks_late=True, max_retries=None)(pool_study)
    reindex.register(app)


def _store(task: Any) -> CodeStore:
    from workers.app import redis_for

    return CodeStore(redis_for(task.app), task.app.drh_settings.redis_namespace)


def index_instance(
    self: ModelTask,
    sop_uid: str,
    study_uid: str,
    path: str,
    source_ae: str = "",
    received_at: float = 0.0,
    **_: Any,
) -> str:
    """Index one received instance, batched with other pending ones; returns the outcome."""
    settings = self.app.drh_settings
    try:
        return _index(self, Item(sop_uid, study_uid, path, source_ae, float(received_at), own=True))
    except (TransientError, ModelUnavailable, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        retries = self.request.retries or 0
        client = _safe_client(self)
        if retries >= settings.task_max_retries:
            reason = f"transient error persisted after {retries} retries: {exc}"
            log.error("instance %s failed: %s", sop_uid, reason)
            if client is not None:
                _record_failure(
                    self, Item(sop_uid, study_uid, path, source_ae, float(received_at)), reason, "transient"
                )
            return "failed"
        delay = backoff(retries)
        log.warning("instance %s: %s; retry %d in %.0f s", sop_uid, exc, retries + 1, delay)
        if client is not None:
            metrics.count_task(client, settings.redis_namespace, "index_instance", "retried")
        raise self.retry(exc=exc, countdown=delay) from exc
    except Exception as exc:
        # A bug or an unexpected library error: never lose the instance silently. It goes to the
        # ledger (retryable once fixed); if even that fails, the SCP's reconciler re-queues it.
        log.exception("instance %s: unexpected error", sop_uid)
        reason = f"internal error: {exc.__class__.__name__}: {exc}"[:500]
        _record_failure(self, Item(sop_uid, study_uid, path, source_ae, float(received_at)), reason, "error")
        return "failed"


def _record_failure(task: Any, item: Item, reason: str, kind: str) -> None:
    store = _store(task)
    FailureLedger(store.r, store.keys.ns).record(item.payload(), reason, kind=kind)
    _mark(store, item, "failed")
    metrics.count_task(store.r, store.keys.ns, "index_instance", "failed")


def _safe_client(task: Any) -> redis.Redis | None:
    from workers.app import redis_for

    try:
        client = redis_for(task.app)
        client.ping()
        return client
    except redis.exceptions.RedisError:
        return None


def _already_indexed(store: CodeStore, versions: list[str], item: Item) -> bool:
    """True when this arrival of the instance (or a later one) is settled: ignored, failed (until
    someone retries it) or indexed for every target version."""
    info = store.instance(item.sop_uid)
    if not info or info.get("state") not in {"indexed", "ignored", "failed"}:
        return False
    if float(info.get("indexed_received_at", "0") or 0) < item.received_at:
        return False
    if info.get("state") in {"ignored", "failed"}:
        return True  # settled; a retry from the ledger sets the state to "retrying" first
    return all(store.r.hexists(store.keys.slot(v, "image"), item.sop_uid) for v in versions)


def _pooled_before_indexed(store: CodeStore, version: str, item: Item) -> bool:
    """True when no pooling of the item's study started after the item was indexed."""
    indexed_at = float(store.r.hget(store.keys.instance(item.sop_uid), "indexed_at") or 0)
    started = float(store.r.hget(store.keys.study(item.study_uid), f"pool_started:{version}") or 0)
    return started < indexed_at


def _index(task: ModelTask, own: Item) -> str:
    settings = task.app.drh_settings
    store = _store(task)
    r = store.r
    ns = settings.redis_namespace
    versions = target_versions(task, store)
    if _already_indexed(store, [v for v, _ in versions], own):
        r.hdel(payload_key(ns), own.sop_uid)
        r.zrem(pending_key(ns), own.sop_uid)
        r.hdel(claim_key(ns), own.sop_uid)
        # The first run may have died between its writes and scheduling the study pooling.
        if _pooled_before_indexed(store, versions[0][0], own):
            schedule_pooling(task.app, r, own.study_uid)
        metrics.count_task(r, ns, "index_instance", "duplicate")
        return "duplicate"

    now = time.time()
    lease = now + settings.batch_claim_seconds
    res = r.eval(
        _CLAIM_LUA,
        3,
        pending_key(ns),
        payload_key(ns),
        claim_key(ns),
        own.sop_uid,
        max(0, settings.batch_size - 1),
        now,
        lease,
        task.request.id or "",
    )
    if int(res[0]) == 0:
        # Another task is hashing this instance right now: come back when its lease ends. The new
        # message is published before this one is acknowledged, so nothing can be lost here.
        wait = max(1.0, float(res[1]) - now + 1.0)
        task.apply_async(kwargs=own.payload(), countdown=wait)
        metrics.count_task(r, ns, "index_instance", "deferred")
        return "deferred"
    items = [own]
    for raw in res[2:]:
        p = json.loads(raw)
        if p["sop_uid"] != own.sop_uid:
            items.append(Item(p["sop_uid"], p["study_uid"], p["path"], p.get("source_ae", ""), p["received_at"]))
    claimed = [it.sop_uid for it in items]
    try:
        return _index_batch(task, store, versions, items)
    finally:
        r.hdel(claim_key(ns), *claimed)
        for it in items:
            if it.local_copy:
                Path(it.local_copy).unlink(missing_ok=True)


def _index_batch(task: ModelTask, store: CodeStore, versions: list[tuple[str, Any]], items: list[Item]) -> str:
    settings = task.app.drh_settings
    r = store.r
    ns = settings.redis_namespace
    ledger = FailureLedger(r, ns)
    active = versions[0][0]
    images: list[Item] = []
    own_outcome = ""
    for it in items:
        if not it.own and _already_indexed(store, [v for v, _ in versions], it):
            r.hdel(payload_key(ns), it.sop_uid)
            continue
        crashes = int(r.hincrby(decoding_key(ns), it.sop_uid, 1)) - 1
        try:
            if crashes >= MAX_DECODE_CRASHES:
                raise PermanentError(
                    f"decoding this file killed the worker process {crashes} times (a codec crash); not tried again"
                )
            not_image = load_item(settings, it)
        except TransientError:
            if it.own:
                raise
            continue  # its own message retries it, with its own back-off
        except PermanentError as exc:
            log.error("instance %s failed: %s", it.sop_uid, exc)
            ledger.record(it.payload(), str(exc), kind="permanent")
            _mark(store, it, "failed")
            r.hdel(payload_key(ns), it.sop_uid)
            metrics.count_task(r, ns, "index_instance", "failed")
            if it.own:
                own_outcome = "failed"
            continue
        finally:
            r.hdel(decoding_key(ns), it.sop_uid)  # not reached when the process dies while decoding
        if not_image:
            log.info("instance %s ignored: %s", it.sop_uid, not_image)
            ledger.record_ignored(it.payload(), not_image)
            _mark(store, it, "ignored")
            ledger.resolve(it.sop_uid)
            r.hdel(payload_key(ns), it.sop_uid)
            metrics.count_task(r, ns, "index_instance", "ignored")
            if it.own:
                own_outcome = "ignored"
            continue
        images.append(it)
    if not images:
        return own_outcome or "duplicate"

    encoded = []
    for version, enc in versions:
        codes, emb = enc.encode_images([it.pixels for it in images], batch_size=settings.batch_size)
        encoded.append((version, enc, codes, emb))
        store.register_model(version, enc.nbits)
    # Metadata first: a code is never searchable before its instance and study records exist (the
    # replica filters on the study record, C-FIND answers are built from the study hash).
    studies: dict[str, Item] = {}
    for it in images:
        meta = instance_meta(it.ds)
        meta.update(path=it.path, received_at=it.received_at, source_ae=it.source_ae)
        store.put_instance(it.sop_uid, it.study_uid, meta)
        _update_study(store, it)
        studies[it.study_uid] = it
    _hold(settings, "before_write")
    for version, _enc, codes, emb in encoded:
        for n, it in enumerate(images):
            store.put_embedding(version, it.sop_uid, emb[n])
            store.upsert_code(version, "image", it.sop_uid, codes[n], study_uid=it.study_uid)
    for it in images:
        # the idempotency record last: a task killed before this line is simply done again
        r.hset(
            store.keys.instance(it.sop_uid),
            mapping={
                "state": "indexed",
                "indexed_version": active,
                "indexed_received_at": repr(it.received_at),
                "indexed_at": repr(time.time()),
            },
        )
        ledger.resolve(it.sop_uid)
        r.hdel(payload_key(ns), it.sop_uid)
        metrics.observe_latency(r, ns, time.time() - it.received_at)
        metrics.count_task(r, ns, "index_instance", "done")
        if not settings.keep_files and not it.local_copy:
            Path(it.path).unlink(missing_ok=True)
        if it.own:
            own_outcome = "indexed"
    _hold(settings, "after_write")
    for study_uid in studies:
        schedule_pooling(task.app, r, study_uid)
    log.info("indexed %d instance(s) with %s", len(images), ",".join(v for v, *_ in encoded))
    return own_outcome or "indexed"


def _mark(store: CodeStore, it: Item, state: str) -> None:
    """Record a settled instance that is not indexed (the SCP reconciler skips it)."""
    store.r.hset(
        store.keys.instance(it.sop_uid),
        mapping={
            "study_uid": it.study_uid,
            "path": it.path,
            "source_ae": it.source_ae,
            "received_at": str(it.received_at),
            "state": state,
            "indexed_received_at": str(it.received_at),
        },
    )


def _update_study(store: CodeStore, it: Item) -> None:
    meta = study_meta(it.ds)
    meta["source_ae"] = it.source_ae
    meta["study_uid"] = it.study_uid
    args: list[Any] = [str(it.ds.get("Modality", "") or "").strip(), repr(float(it.received_at))]
    for k, v in meta.items():
        args += [k, str(v)]
    store.r.eval(_STUDY_LUA, 2, store.keys.study(it.study_uid), store.keys.study_instances(it.study_uid), *args)
    store.put_study(it.study_uid, {})  # refresh the study's filter record from the merged hash


def schedule_pooling(app: Celery, r: redis.Redis, study_uid: str) -> None:
    """Schedule one pooling of the study for when it will be stable (at most one pending per study).

    The marker key is deleted by ``pool_study`` *before* it reads the study's instances, so an
    instance indexed after that read schedules a new pooling: a late instance always recomputes.
    """
    settings = app.drh_settings  # type: ignore[attr-defined]
    key = pool_sched_key(settings.redis_namespace, study_uid)
    ttl = int(settings.study_stable_seconds + settings.task_visibility_timeout + 60)
    if r.set(key, "1", nx=True, ex=ttl):
        app.send_task(
            "drh.pool_study", kwargs={"study_uid": study_uid}, queue="study", countdown=settings.study_stable_seconds
        )


def pool_study(self: ModelTask, study_uid: str, version: str = "") -> str:
    """Compute the DMIH study code once the study is stable; re-schedule itself otherwise."""
    settings = self.app.drh_settings
    try:
        store = _store(self)
        r = store.r
        ns = settings.redis_namespace
        last = float(store.study(study_uid).get("last_instance_at", "0") or 0)
        wait = last + settings.study_stable_seconds - time.time()
        if wait > 0.05:
            self.apply_async(kwargs={"study_uid": study_uid, "version": version}, countdown=wait)
            metrics.count_task(r, ns, "pool_study", "deferred")
            return "deferred"
        if not version:
            r.delete(pool_sched_key(ns, study_uid))
        versions = [(version, encoder_for_version(self, store, version))] if version else target_versions(self, store)
        started = time.time()
        sops = store.study_instances(study_uid)
        outcome = "empty"
        for v, enc in versions:
            embs = store.get_embeddings(v, sops)
            if not embs:
                continue
            bag = np.stack([embs[s] for s in sorted(embs)]).astype(np.float32)
            code = enc.encode_study(bag)
            store.upsert_code(v, "study", study_uid, code)
            r.hset(
                store.keys.study(study_uid),
                mapping={f"pooled_n:{v}": len(embs), f"pooled_at:{v}": time.time(), f"pool_started:{v}": started},
            )
            outcome = "pooled"
        metrics.count_task(r, ns, "pool_study", "done")
        log.info("study %s pooled over %d instance(s)", study_uid, len(sops))
        return outcome
    except (ModelUnavailable, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        retries = self.request.retries or 0
        if retries >= settings.task_max_retries:
            log.error("study %s pooling failed after %d retries: %s", study_uid, retries, exc)
            client = _safe_client(self)
            if client is not None:
                metrics.count_task(client, settings.redis_namespace, "pool_study", "failed")
            return "failed"
        raise self.retry(exc=exc, countdown=backoff(retries)) from exc
