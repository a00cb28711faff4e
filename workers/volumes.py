"""Volumes as bags: a CT or MR series is encoded from a bounded, evenly spaced sample of its slices.

A 500-slice series would be 500 model passes and 500 near-identical image codes. Instead, its slices
are recorded as they arrive (state ``volume-slice``, :func:`workers.batching.mark_volume_slices`),
and when the study is stable (the pooling of :mod:`workers.tasks`), each series is sorted by
InstanceNumber and at most ``Settings.max_frames_per_series`` evenly spaced slices are decoded and
encoded: they get image codes (searchable as images), and DMIH pools their embeddings, with the
study's other images, into the study code. The other slices point to their nearest sampled slice
(``represented_by``), which answers for them in an image query. A late slice re-samples its series,
keeping the slices already encoded that still fit; slices no longer in the sample leave the index, so
a series never holds more than the bound of codes, and a pooling encodes at most that many slices
per series whatever its size. (A multi-frame object is sampled the same way, by frames, when it is indexed:
:func:`workers.batching.encode_items`.)
"""

from __future__ import annotations

import logging
from typing import Any

from hashing.preprocess import evenly_spaced
from plugin.core.settings import Settings
from plugin.store import Store
from workers import batching
from workers.batching import Item, PermanentError

log = logging.getLogger("drh.workers.volumes")


def _position(record: dict[str, str], sop: str) -> tuple[int, str]:
    try:
        return int(float(record.get("instance_number") or 0)), sop
    except ValueError:
        return 0, sop


def series_of(store: Store, study_uid: str, route: str) -> dict[str, list[str]]:
    """SOP UIDs of the study's volume slices of ``route``, per series, in InstanceNumber order."""
    sops = store.records.study_instances(study_uid)
    series: dict[str, list[tuple[tuple[int, str], str]]] = {}
    for sop, rec in zip(sops, store.records.instances(sops), strict=True):
        if rec.get("volume") == "1" and rec.get("route") == route and rec.get("state") in ("volume-slice", "indexed"):
            series.setdefault(rec.get("series_uid", ""), []).append((_position(rec, sop), sop))
    return {uid: [sop for _, sop in sorted(members)] for uid, members in series.items()}


def choose(total: int, limit: int, encoded: set[int]) -> list[int]:
    """Positions of the sample: :func:`evenly_spaced`, except that a slice already encoded within
    half a step of an ideal position stands for it. A series that grows while it is pooled (slices
    still arriving, a late slice) keeps most of its sample instead of being encoded again."""
    ideal = evenly_spaced(total, limit)
    half = total / max(1, len(ideal)) / 2
    picked: set[int] = set()
    for i in ideal:
        near = [e for e in encoded if e not in picked and abs(e - i) <= half]
        pick = min(near, key=lambda e: (abs(e - i), e)) if near else i
        picked.add(pick if pick not in picked else i)
    return sorted(picked)


def encode_volumes(settings: Settings, store: Store, enc: Any, version: str, study_uid: str) -> int:
    """Sample and encode the study's volume series for ``version``; returns the slices encoded now.

    Idempotent: a slice already encoded for the version is not encoded again (one read of the
    series' slots tells which are); an unchanged series costs no model pass, only the rewrite of its
    slices' ``represented_by``.
    """
    route = store.models.route_of(version).name
    encoded = 0
    for series_uid, sops in series_of(store, study_uid, route).items():
        slots = store.codes.slots_of(version, "image", sops)  # one read: which slices have a code
        have = {n for n, slot in enumerate(slots) if slot is not None}
        chosen = choose(len(sops), settings.max_frames_per_series, have)
        todo = [sops[n] for n in chosen if n not in have]
        done = set(_encode_slices(settings, store, enc, version, study_uid, todo))
        settled = set(todo) - done  # failed or not an image: their state says so, and they leave the series
        sampled = [n for n in chosen if n in have or sops[n] in done]
        encoded += len(done)
        for n, sop in enumerate(sops):
            if n in sampled or sop in settled:
                continue
            if n in have:  # in an earlier sample, not in this one
                store.codes.delete(version, "image", sop)
                store.embeddings.delete(version, [sop])
            nearest = sops[min(sampled, key=lambda s: abs(s - n))] if sampled else ""
            store.records.update_instance(sop, {"state": "volume-slice", "represented_by": nearest})
        log.info(
            "series %s: %d slice(s), %d sampled for %s (%d encoded now)",
            series_uid,
            len(sops),
            len(sampled),
            version,
            len(done),
        )
    return encoded


def _encode_slices(
    settings: Settings, store: Store, enc: Any, version: str, study_uid: str, sops: list[str]
) -> list[str]:
    """Decode and encode these slices for ``version``; returns the ones encoded (a slice that fails
    goes to the failure ledger, a non-image is ignored, both with their reason)."""
    items = []
    for sop in sops:
        rec = store.records.instance(sop)
        it = Item(sop, study_uid, rec.get("path", ""), rec.get("source_ae", ""), float(rec.get("received_at") or 0))
        try:
            not_image = batching.load_guarded(settings, store, it)
        except PermanentError as exc:
            log.error("slice %s of study %s failed: %s", sop, study_uid, exc)
            batching.record_failure(store, it, str(exc), "permanent")
            continue
        if not_image:
            store.ledger.record_ignored(it.payload(), not_image)
            batching.mark_settled(store, it, "ignored")
            continue
        items.append(it)
    try:
        if items:
            out = batching.encode_items(enc, items, settings.batch_size)
            batching.write_codes(store, [(version, out)], items)
            answering = store.models.is_active(version)  # a re-index's version does not claim the record yet
            claimed = [answering or not store.records.instance(it.sop_uid).get("indexed_version") for it in items]
            pipe = store.client.pipeline(transaction=True)  # states and counts seen together
            for it, claim in zip(items, claimed, strict=True):
                fields = {"state": "indexed", "represented_by": ""}
                if claim:
                    fields["indexed_version"] = version
                store.records.update_instance(it.sop_uid, fields, pipe)
                batching.count_indexed(store, it, pipe)
            pipe.execute()
    finally:
        for it in items:
            it.forget_local_copy()
    return [it.sop_uid for it in items]
