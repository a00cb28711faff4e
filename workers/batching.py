"""Indexing a batch of instances: read and decode each, one model pass, then the Redis writes in order.

A task holding the message of one instance claims other pending ones (:mod:`plugin.store.ingest`)
and indexes them together. Each instance ends in one outcome: ``indexed``; ``ignored`` (a non-image
object, :class:`hashing.preprocess.NotAnImage`: recorded, not a failure); ``failed`` (a permanent
decode error: written to the failure ledger, from where IT staff retry it). A transient error of
the task's own instance propagates, so the task's declared retries handle it; another claimed
instance with a transient error is left to its own message.

Write order, so that a worker killed at any point leaves a state a second run completes: records
first (a code is never searchable before its instance and study records exist: the replica filters on
the study record, C-FIND answers are built from the study hash), then embeddings and codes (upserts by
UID: same slot, same code), then the idempotency record, last.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from plugin.core.header import instance_meta, routing_header, study_meta
from plugin.core.settings import Settings
from plugin.store import SETTLED_STATES, Store

if TYPE_CHECKING:
    from workers.model import Router

log = logging.getLogger("drh.workers.batching")


# A file whose decoding killed the worker process this many times (a codec crashing hard on it) is
# recorded as a permanent failure instead of being redelivered, and crashing workers, for ever.
MAX_DECODE_CRASHES = 3


class TransientError(RuntimeError):
    """Worth retrying: Redis or the HTTP API briefly unreachable, a decode error flagged transient."""


class PermanentError(RuntimeError):
    """Retrying will not help until someone acts (a corrupt file, an unsupported encoding)."""


class DeviceError(TransientError):
    """The model's device failed while encoding (CUDA out of memory, a CUDA, cuDNN or driver error,
    memory the host could not give): not the images' fault, so they are retried with back-off, and
    recorded as transient (retryable) if it lasts, never as their own "internal error"."""


# What the messages of a device's failures say (PyTorch raises them as RuntimeError subclasses).
_DEVICE_FAILURES = ("CUDA", "cuDNN", "CUBLAS", "out of memory", "device-side assert", "can't allocate memory")


def device_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised by the model's forward pass, is its device failing."""
    if type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError"):
        return True
    return isinstance(exc, RuntimeError) and any(word in str(exc) for word in _DEVICE_FAILURES)


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
    frames: list[np.ndarray] | None = None  # a multi-frame object's sampled frames (pixels: the middle one)
    volume: bool = False  # a slice of a volume series: encoded with its series once the study is stable
    fell_back: bool = False  # the general model takes it though a route takes its modality (counted so)
    local_copy: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_payload(cls, p: dict[str, Any], own: bool = False) -> Item:
        return cls(p["sop_uid"], p["study_uid"], p["path"], p.get("source_ae", ""), float(p["received_at"]), own)

    def payload(self) -> dict[str, Any]:
        return {
            "sop_uid": self.sop_uid,
            "study_uid": self.study_uid,
            "path": self.path,
            "source_ae": self.source_ae,
            "received_at": self.received_at,
        }

    def forget_local_copy(self) -> None:
        if self.local_copy:
            Path(self.local_copy).unlink(missing_ok=True)


def hold(settings: Settings, stage: str) -> None:
    """Fault-injection hook for the fault tests: wait while ``<fault_hold_dir>/<stage>.hold`` exists.

    Inert unless ``Settings.fault_hold_dir`` is set. It lets a test kill a worker at a known point of
    a task (before or after the Redis writes) instead of hoping a sleep lands there.
    """
    if not settings.fault_hold_dir:
        return
    folder = Path(settings.fault_hold_dir)
    marker = folder / f"{stage}.hold"
    if not marker.exists():
        return
    (folder / f"{stage}.reached").write_text(str(os.getpid()))
    while marker.exists():
        time.sleep(0.05)


# -- reading instances -----------------------------------------------------------------------------


def fetch(settings: Settings, item: Item) -> str:
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


def is_volume_slice(settings: Settings, ds: Any) -> bool:
    """A single-frame image of a volume modality (CT, MR...): one slice of a series that is encoded
    as a whole, from at most ``max_frames_per_series`` slices, once its study is stable."""
    from hashing.sopclass import number_of_frames

    modality = str(ds.get("Modality", "") or "").strip().upper()
    return modality in {m.upper() for m in settings.volume_modalities} and number_of_frames(ds) == 1


def load_item(settings: Settings, item: Item, *, defer_volume: bool = False) -> str:
    """Read and decode one instance; returns "" or the reason it is not an image (to ignore). A
    multi-frame object gets at most ``max_frames_per_series`` evenly spaced frames; with
    ``defer_volume`` a volume slice is only checked to be an image (its series is sampled later).

    Raises TransientError / PermanentError for failures.
    """
    from hashing.preprocess import DecodeError, NotAnImage, load_frames, load_pixels, read_dataset
    from hashing.sopclass import check_is_image, number_of_frames

    path = item.path
    if not os.path.exists(path):
        if not settings.api_url:
            raise PermanentError(f"file {path} is missing and no api_url is set to fetch it")
        path = item.local_copy = fetch(settings, item)
    try:
        item.ds = read_dataset(path)
        if defer_volume and is_volume_slice(settings, item.ds):
            check_is_image(item.ds)
            item.volume = True
        elif number_of_frames(item.ds) > 1:
            item.frames = load_frames(item.ds, settings.max_frames_per_series)
            item.pixels = item.frames[len(item.frames) // 2]
        else:
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


# -- outcomes --------------------------------------------------------------------------------------


def already_settled(store: Store, item: Item) -> bool:
    """True when this arrival of the instance (or a later one) is settled: ignored, failed (until
    someone retries it), stored without a model, or indexed (its code is there). A re-index's new
    version that missed it is completed by the re-index's final sweep."""
    info = store.records.instance(item.sop_uid)
    if not info or info.get("state") not in SETTLED_STATES:
        return False
    if float(info.get("indexed_received_at", "0") or 0) < item.received_at:
        return False
    if info.get("state") != "indexed":
        return True  # settled; a retry from the ledger sets the state to "retrying" first
    return store.codes.has(info.get("indexed_version", ""), "image", item.sop_uid)


def pooled_before_indexed(store: Store, item: Item) -> bool:
    """True when no pooling of the item's study started after the item was indexed."""
    info = store.records.instance(item.sop_uid)
    indexed_at = float(info.get("indexed_at") or 0)
    return store.records.pool_started(item.study_uid, info.get("indexed_version", "")) < indexed_at


def mark_settled(store: Store, it: Item, state: str, pipe: redis.client.Pipeline | None = None) -> None:
    """Record a settled instance that is not indexed (the SCP reconciler skips it); with ``pipe``,
    queued on the caller's transaction."""
    store.records.update_instance(
        it.sop_uid,
        {
            "study_uid": it.study_uid,
            "path": it.path,
            "source_ae": it.source_ae,
            "received_at": str(it.received_at),
            "state": state,
            "indexed_received_at": str(it.received_at),
        },
        pipe,
    )


def modality_of(item: Item) -> str:
    """The item's modality for the per-modality counts ("(unread)" when its header was not read)."""
    if item.ds is None:
        return "(unread)"
    return str(item.ds.get("Modality", "") or "").strip() or "(none)"


def record_failure(store: Store, item: Item, reason: str, kind: str) -> None:
    """An instance that will not be indexed without someone acting: ledger, state and counters, in
    one transaction (a status page that sees the instance failed also counts it)."""
    store.ledger.record(
        item.payload(), reason, kind=kind, also=lambda pipe: settle_counted(store, item, "failed", pipe)
    )


def settle_counted(store: Store, it: Item, outcome: str, pipe: redis.client.Pipeline) -> None:
    """Queue on the caller's transaction an instance settled without an index (``failed``,
    ``ignored``): its state, the end of its pending hint and both counts, so that a reader never
    sees the state without the counts."""
    mark_settled(store, it, outcome, pipe)
    store.records.note_unindexed(it.study_uid, it.sop_uid, outcome, pipe)
    store.ingest.done(it.sop_uid, it.study_uid, pipe)
    store.stats.count_task("index_instance", outcome, pipe=pipe)
    store.stats.count_modality(outcome, modality_of(it), pipe=pipe)


def count_indexed(store: Store, it: Item, pipe: redis.client.Pipeline) -> None:
    """Queue an indexed instance's counts on the transaction that writes its state (with
    ``to-general`` when the general model took it though a route takes its modality)."""
    store.stats.count_task("index_instance", "done", pipe=pipe)
    store.stats.count_modality("indexed", modality_of(it), pipe=pipe)
    if it.fell_back:
        store.stats.count_modality("to-general", modality_of(it), pipe=pipe)


# -- the batch -------------------------------------------------------------------------------------


def decode_items(settings: Settings, store: Store, items: list[Item]) -> tuple[list[Item], str]:
    """Decode every item; returns the images to encode and the outcome of the task's own item if it
    is already decided here (ignored, failed) or ""."""
    images: list[Item] = []
    own_outcome = ""
    for it in items:
        if not it.own and already_settled(store, it):
            store.ingest.done(it.sop_uid, it.study_uid)
            continue
        outcome = _decode_one(settings, store, it)
        if outcome == "image":
            images.append(it)
        elif it.own:
            own_outcome = outcome
    return images, own_outcome


def load_guarded(settings: Settings, store: Store, it: Item, *, defer_volume: bool = False) -> str:
    """:func:`load_item`, counted as a decode started until it returns: a file whose decoding killed
    the worker process ``MAX_DECODE_CRASHES`` times is a permanent failure, not tried again (its
    message, redelivered after each death, would otherwise kill every worker that takes it). Ingest,
    re-index and the sampling of a volume's slices at pooling (their pixels are first decoded there)
    decode through it."""
    crashes = store.ingest.decode_started(it.sop_uid)
    try:
        if crashes >= MAX_DECODE_CRASHES:
            raise PermanentError(
                f"decoding this file killed the worker process {crashes} times (a codec crash); not tried again"
            )
        return load_item(settings, it, defer_volume=defer_volume)
    finally:
        store.ingest.decode_finished(it.sop_uid)  # not reached when the process dies while decoding


def _decode_one(settings: Settings, store: Store, it: Item) -> str:
    """ "image", "ignored", "failed" or "later" (another item's transient error: its own message retries)."""
    try:
        not_image = load_guarded(settings, store, it, defer_volume=True)
    except TransientError:
        if it.own:
            raise
        return "later"
    except PermanentError as exc:
        log.error("instance %s failed: %s", it.sop_uid, exc)
        record_failure(store, it, str(exc), "permanent")
        return "failed"
    if not_image:
        log.info("instance %s ignored: %s", it.sop_uid, not_image)
        store.ledger.record_ignored(it.payload(), not_image)
        store.ledger.resolve(it.sop_uid)
        pipe = store.client.pipeline(transaction=True)
        settle_counted(store, it, "ignored", pipe)
        pipe.execute()
        return "ignored"
    return "image"


def encode(versions: list[tuple[str, Any]], images: list[Item], batch_size: int) -> list[tuple[str, Any]]:
    """(version, :class:`hashing.encoder.Encoded`) of the images for every target version: one model
    pass each."""
    return [(version, encode_items(enc, images, batch_size)) for version, enc in versions]


def encode_on_device(enc: Any, images: list[np.ndarray], batch_size: int) -> Any:
    """``enc.encode_images``, its device's failure raised as :class:`DeviceError` (retried), not as
    the images' own error. Ingest, volume sampling and re-index encode through it."""
    try:
        return enc.encode_images(images, batch_size=batch_size)
    except RuntimeError as exc:
        if not device_failure(exc):
            raise
        log.error("the model's device failed on a batch of %d image(s): %s: %s", len(images), type(exc).__name__, exc)
        raise DeviceError(f"the model's device failed: {type(exc).__name__}: {exc}"[:300]) from exc


def encode_items(enc: Any, items: list[Item], batch_size: int) -> Any:
    """One row per item: a single image's code, or for a multi-frame object the DMIH pooling of its
    sampled frames (its code and re-ranking vector; its embedding, what study pooling reads, the
    frames' mean; its query variants, the frames' pooled). All frames of the batch go through the model
    together."""
    from hashing.bits import pooled_variants
    from hashing.encoder import Encoded

    images: list[np.ndarray] = []
    owner: list[int] = []
    for n, it in enumerate(items):
        frames = it.frames or [it.pixels]
        images += frames
        owner += [n] * len(frames)
    out = encode_on_device(enc, images, batch_size)
    if len(images) == len(items):
        return out
    rows_of = np.asarray(owner)
    codes, embeddings, reranks, variants = [], [], [], []
    for n in range(len(items)):
        rows = np.flatnonzero(rows_of == n)
        if len(rows) == 1:
            code, rerank = out.codes[rows[0]], out.rerank[rows[0]]
        else:
            code, rerank = enc.encode_study(out.embeddings[rows])
        codes.append(code)
        reranks.append(rerank)
        embeddings.append(out.embeddings[rows].mean(axis=0))
        variants.append(pooled_variants(out.variants[rows]) if out.variants.shape[1] else out.variants[rows[0]])
    return Encoded(
        np.stack(codes), np.stack(embeddings).astype(np.float32), np.stack(reranks), np.stack(variants).astype(np.int8)
    )


def write_records(store: Store, images: list[Item], route: str = "") -> set[str]:
    """Instance and study records of the images (with the route that took them); returns their studies."""
    studies: set[str] = set()
    for it in images:
        meta = instance_meta(it.ds)
        meta.update(path=it.path, received_at=str(it.received_at), source_ae=it.source_ae, route=route)
        store.records.put_instance(it.sop_uid, it.study_uid, meta)
        fields = study_meta(it.ds)
        fields["source_ae"] = it.source_ae
        fields["study_uid"] = it.study_uid
        modality = str(it.ds.get("Modality", "") or "").strip()
        store.records.merge_instance_into_study(it.study_uid, modality, it.received_at, fields)
        studies.add(it.study_uid)
    return studies


def write_codes(store: Store, encoded: list[tuple[str, Any]], images: list[Item]) -> None:
    for version, out in encoded:
        for n, it in enumerate(images):
            store.embeddings.put(version, it.sop_uid, out.embeddings[n], out.variants[n])
            store.codes.upsert(version, "image", it.sop_uid, out.codes[n], study_uid=it.study_uid, rerank=out.rerank[n])


def mark_indexed(store: Store, settings: Settings, active: str, images: list[Item]) -> None:
    """The idempotency records, last: a task killed before them is simply done again. The batch's
    states, the end of their pending hints and their counts go in one transaction: a status page
    that shows an instance indexed also counts it (the separate writes let a reader see the state
    without the count)."""
    for it in images:
        store.ledger.resolve(it.sop_uid)
    pipe = store.client.pipeline(transaction=True)
    for it in images:
        store.records.update_instance(
            it.sop_uid,
            {
                "state": "indexed",
                "indexed_version": active,
                "indexed_received_at": repr(it.received_at),
                "indexed_at": repr(time.time()),
            },
            pipe,
        )
        store.ingest.done(it.sop_uid, it.study_uid, pipe)
        count_indexed(store, it, pipe)
    pipe.execute()
    for it in images:
        store.stats.observe_latency(time.time() - it.received_at)
        if not settings.keep_files and not it.local_copy:
            Path(it.path).unlink(missing_ok=True)


def mark_no_model(store: Store, images: list[Item]) -> None:
    """Images no route takes (``unrouted`` is ``none``): stored with their records and file, counted
    per modality, never hashed by an unrelated model. Registering a model for their route
    (``drh-pacs register``) indexes them."""
    was = {it.sop_uid: store.records.instance(it.sop_uid).get("state") for it in images}
    write_records(store, images)
    for it in images:
        modality = modality_of(it)
        if was[it.sop_uid] != "no-model":  # a redelivered message counts once
            store.stats.count_no_model(modality)
            store.stats.count_modality("no-model", modality)
        _settle_recorded(store, it, "no-model", {"indexed_version": ""})
        log.info("instance %s (%s) stored without a model: no route takes it", it.sop_uid, modality)


def mark_volume_slices(store: Store, images: list[Item], route: str) -> set[str]:
    """Slices of volume series: recorded (records, route, file kept), settled as ``volume-slice``;
    :mod:`workers.volumes` encodes a bounded sample of each series when the study is pooled."""
    studies = write_records(store, images, route=route)
    for it in images:
        _settle_recorded(store, it, "volume-slice", {"volume": "1"})
    return studies


def _settle_recorded(store: Store, it: Item, state: str, fields: dict[str, str]) -> None:
    """An instance whose records are written and that waits in ``state`` (counted as that outcome):
    its message is done, and any earlier failure of it is resolved."""
    store.ledger.resolve(it.sop_uid)
    pipe = store.client.pipeline(transaction=True)  # the state and its count seen together, as indexed
    store.records.update_instance(
        it.sop_uid, {"state": state, "indexed_received_at": repr(it.received_at), **fields}, pipe
    )
    store.ingest.done(it.sop_uid, it.study_uid, pipe)
    store.stats.count_task("index_instance", state, pipe=pipe)
    pipe.execute()


# When each kind of image that fell back to the general model was last logged: a hospital with a
# chest route also receives hand and knee films, every one of them a fall-back, and a line for each
# would bury the worker log. They are all counted (``to-general``); the log shows each kind again
# after this many seconds, per worker process; at most this many kinds are remembered (the body part
# as written is free text).
FELL_BACK_LOG_SECONDS = 600.0
FELL_BACK_KINDS = 1000
_fell_back_logged: dict[tuple[str, str, str], float] = {}
_clock = time.monotonic


def log_fell_back(it: Item, header: tuple[str, str, str]) -> bool:
    """Log an image the general model reads though a route takes its modality, once per kind
    (modality, routing body part, BodyPartExamined as written) in :data:`FELL_BACK_LOG_SECONDS`;
    returns whether it logged."""
    examined = str(it.ds.get("BodyPartExamined", "") or "")
    kind = (header[0], header[1], examined)
    now = _clock()
    last = _fell_back_logged.get(kind)
    if last is not None and now - last < FELL_BACK_LOG_SECONDS:
        return False
    if len(_fell_back_logged) >= FELL_BACK_KINDS:
        _fell_back_logged.clear()  # forgetting only makes a kind show again
    _fell_back_logged[kind] = now
    log.info(
        "instance %s (%s) to the general model: no route for %s takes body part %r (read from"
        " BodyPartExamined %r, the Anatomic Region Sequence or the descriptions); counted as"
        " to-general, and images like it are not logged again for %d s",
        it.sop_uid, header[0], header[0], header[1], examined, FELL_BACK_LOG_SECONDS,
    )  # fmt: skip
    return True


def index_batch(settings: Settings, store: Store, router: Router, items: list[Item]) -> tuple[str, set[str]]:
    """Index the claimed items, each with the model of its route (``router``: header -> (route,
    version, encoder) to write, the answering one first); returns the outcome of the task's own item
    and the studies to pool. An image the general model takes though a specific route takes its
    modality is counted (``to-general``, per modality) and logged with what its header said."""
    images, own_outcome = decode_items(settings, store, items)
    if not images:
        return own_outcome or "duplicate", set()
    groups: dict[tuple[str, ...], tuple[list[tuple[str, str, Any]], list[Item]]] = {}
    unrouted: list[Item] = []
    slices: dict[str, list[Item]] = {}
    for it in images:
        header = routing_header(it.ds)
        targets = router(header)
        it.fell_back = bool(targets) and not it.volume and router.fell_back(header)
        if it.fell_back:
            log_fell_back(it, header)
        if not targets:
            unrouted.append(it)
        elif it.volume:
            slices.setdefault(targets[0][0], []).append(it)
        else:
            key = tuple(v for _, v, _ in targets)
            groups.setdefault(key, (targets, []))[1].append(it)
    if unrouted:
        mark_no_model(store, unrouted)
    studies: set[str] = set()
    for route, group in slices.items():
        studies |= mark_volume_slices(store, group, route)
    for targets, group in groups.values():
        versions = [(version, enc) for _, version, enc in targets]
        encoded = encode(versions, group, settings.batch_size)
        for version, enc in versions:
            store.models.register(version, enc.nbits, rerank_dim=enc.rerank_dim)
        studies |= write_records(store, group, route=targets[0][0])
        hold(settings, "before_write")
        write_codes(store, encoded, group)
        mark_indexed(store, settings, versions[0][0], group)
        hold(settings, "after_write")
        names = ",".join(v for v, _ in versions)
        log.info("indexed %d instance(s) with %s (route %s)", len(group), names, targets[0][0])
    if not own_outcome:
        own = next((it for it in images if it.own), None)
        if own is not None:
            own_outcome = "no-model" if own in unrouted else "volume-slice" if own.volume else "indexed"
    return own_outcome or "indexed", studies
