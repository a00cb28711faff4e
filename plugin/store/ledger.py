"""The failure ledger: instances that could not be indexed, why, and what to re-queue to try again.

Kept in Redis so every worker writes to it and every status page reads it (keys in
:mod:`plugin.store.keys`): an entry per SOPInstanceUID, JSON {reason, kind (``permanent``,
``transient`` that outlived its retries, or ``error``: a bug), first_seen, last_seen, count, state
(failed|retrying), and the task payload: study_uid, path, source_ae, received_at}; a sorted set by
last failure for status pages; the ``ignored`` hash of non-image objects, accepted and
deliberately not indexed; and the ``refused`` hash of C-STOREs the SCP refused (a malformed or
truncated dataset: nothing was spooled, so nothing here can be re-queued; the sender must send it
again once it is fixed), so that a PACS's "refused" log line has its reason on our side.

A retry (:func:`workers.client.retry_failed`) re-queues the original task payload (the file is still
on the spool) and marks the entry ``retrying``; a success removes the entry, a new failure bumps
``count`` and ``last_seen``. Reasons carry no patient data: they come from our decode errors, which
name tags and codes, not values.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import redis

from plugin.store.keys import Keys

PAYLOAD_FIELDS = ("sop_uid", "study_uid", "path", "source_ae", "received_at")


class FailureLedger:
    """Read and write the ledger; cheap to construct (holds only a client and the key names)."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys

    def record(
        self,
        payload: dict[str, Any],
        reason: str,
        kind: str = "permanent",
        also: Callable[[redis.client.Pipeline], None] | None = None,
    ) -> dict[str, Any]:
        """Add or update the entry of ``payload['sop_uid']``; returns the entry.

        ``also`` queues more writes on the same transaction (the instance's state, its counts): a
        reader then never sees one without the others, and a worker killed between them leaves none.
        """
        sop = payload["sop_uid"]
        now = time.time()
        key = self.keys.failures()
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, sop)
                    entry = json.loads(raw) if raw else {"first_seen": now, "count": 0}
                    entry.update({k: payload[k] for k in PAYLOAD_FIELDS})
                    entry.update(reason=reason, kind=kind, last_seen=now, count=entry["count"] + 1, state="failed")
                    pipe.multi()
                    pipe.hset(key, sop, json.dumps(entry))
                    pipe.zadd(self.keys.failures_recent(), {sop: now})
                    if also is not None:
                        also(pipe)
                    pipe.execute()
                    return entry
                except redis.exceptions.WatchError:
                    continue

    def resolve(self, sop_uid: str) -> bool:
        """Forget an entry (the instance is now indexed, ignored or deleted); True when there was one.

        A refusal of an earlier copy goes too: the instance arrived whole since.
        """
        pipe = self.r.pipeline()
        pipe.hdel(self.keys.failures(), sop_uid)
        pipe.zrem(self.keys.failures_recent(), sop_uid)
        pipe.hdel(self.keys.refused(), sop_uid)
        pipe.zrem(self.keys.refused_recent(), sop_uid)
        removed, *_ = pipe.execute()
        return bool(removed)

    def mark_retrying(self, sop_uid: str) -> dict[str, Any] | None:
        """Mark an entry as re-queued; returns it (None when the UID is not in the ledger)."""
        entry = self.get(sop_uid)
        if entry is None:
            return None
        entry["state"] = "retrying"
        entry["retried_at"] = time.time()
        self.r.hset(self.keys.failures(), sop_uid, json.dumps(entry))
        return entry

    def unmark_retrying(self, sop_uid: str) -> None:
        """The re-queue did not happen (the broker was down): the entry is a failure again, which
        the next retry takes (and the spool reconciler leaves alone, as any ledger entry)."""
        entry = self.get(sop_uid)
        if entry is not None:
            entry["state"] = "failed"
            entry.pop("retried_at", None)
            self.r.hset(self.keys.failures(), sop_uid, json.dumps(entry))

    def get(self, sop_uid: str) -> dict[str, Any] | None:
        raw = self.r.hget(self.keys.failures(), sop_uid)
        return json.loads(raw) if raw else None

    def contains(self, sop_uids: list[str]) -> list[bool]:
        """Whether each UID has an entry, in one round trip."""
        if not sop_uids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for uid in sop_uids:
            pipe.hexists(self.keys.failures(), uid)
        return [bool(x) for x in pipe.execute()]

    def count(self) -> int:
        return int(self.r.hlen(self.keys.failures()))

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The ``limit`` most recent failures, newest first."""
        uids = [u.decode() for u in self.r.zrevrange(self.keys.failures_recent(), 0, max(0, limit - 1))]
        if not uids:
            return []
        return [json.loads(raw) for raw in self.r.hmget(self.keys.failures(), uids) if raw]

    def all_uids(self) -> list[str]:
        return [u.decode() for u in self.r.hkeys(self.keys.failures())]

    def record_ignored(self, payload: dict[str, Any], reason: str) -> None:
        entry = {"reason": reason, "study_uid": payload["study_uid"], "when": time.time()}
        self.r.hset(self.keys.ignored(), payload["sop_uid"], json.dumps(entry))

    def ignored_count(self) -> int:
        return int(self.r.hlen(self.keys.ignored()))

    def record_refused(self, sop_uid: str, study_uid: str, source_ae: str, reason: str, status: int) -> None:
        """Note a C-STORE the SCP refused, with the reason it answered (no patient data in it)."""
        now = time.time()
        key = self.keys.refused()
        raw = self.r.hget(key, sop_uid)
        entry = json.loads(raw) if raw else {"first_seen": now, "count": 0}
        entry.update(
            sop_uid=sop_uid,
            study_uid=study_uid,
            source_ae=source_ae,
            reason=reason,
            status=f"{status:#06x}",
            last_seen=now,
            count=int(entry["count"]) + 1,
        )
        pipe = self.r.pipeline()
        pipe.hset(key, sop_uid, json.dumps(entry))
        pipe.zadd(self.keys.refused_recent(), {sop_uid: now})
        if study_uid:  # a query on its study says it was received (Records.unindexed)
            pipe.hset(self.keys.unindexed(study_uid), sop_uid, "refused")
        pipe.execute()

    def refused_count(self) -> int:
        return int(self.r.hlen(self.keys.refused()))

    def refused(self, limit: int = 50) -> list[dict[str, Any]]:
        """The ``limit`` most recent C-STORE refusals, newest first."""
        uids = [u.decode() for u in self.r.zrevrange(self.keys.refused_recent(), 0, max(0, limit - 1))]
        if not uids:
            return []
        return [json.loads(raw) for raw in self.r.hmget(self.keys.refused(), uids) if raw]

    def refused_among(self, sop_uids: list[str]) -> set[str]:
        """Which of ``sop_uids`` were refused at reception, in one round trip."""
        if not sop_uids:
            return set()
        found = self.r.hmget(self.keys.refused(), sop_uids)
        return {uid for uid, raw in zip(sop_uids, found, strict=True) if raw}
