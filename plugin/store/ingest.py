"""Ingest work in progress: the batching hint, model-batch claims, decode crash counts, studies to pool.

Batching for the model (the GPU wants batches, Celery delivers one message per instance): each
enqueued instance is also recorded here, oldest first, with its task payload. A task holding the
message of instance X claims X plus up to ``batch_size - 1`` other pending instances in one script
(:data:`plugin.store.scripts.CLAIM_BATCH`), with a lease deadline, and hashes them in one forward pass.
The claimed instances' own messages are still in the broker: when one is delivered it finds its
instance indexed and returns at once, or, while the lease is live, comes back when it ends. If the
claiming worker dies its claims expire and the instances' own messages index them. The set is only a
hint: losing it costs batching, never data.

Decode crash counts: a decode that kills the worker process (a codec crashing hard) leaves its count
behind; the worker refuses a file that did so too often (see :mod:`workers.batching`).

Study pooling: every indexed instance makes its study *due* at the time it will be stable (a sorted
set, so a late instance only moves the time later). Each hint is also kept in its study's set of
queued instances until it is settled, and a due study waits while that set is not empty (for at most
``study_queue_wait_seconds`` after the latest reception among them: a message lost with its hint
kept must not hold the study back for ever). Workers scan for due studies
(:meth:`IngestState.claim_due_studies`, one script: several scanners never claim the same study)
and pool each under a lease; a study whose worker died is due again when its lease runs out. Nothing
waits in one worker's unacknowledged message, and no marker can keep a late instance from being
pooled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from plugin.store import scripts
from plugin.store.keys import Keys


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim: the payloads claimed (the instance's own first, when its hint was
    kept), or ``busy_until`` set when another task holds the instance."""

    payloads: list[dict[str, Any]]
    busy_until: float | None = None


# How many of a study's oldest and of its newest queued instances each look checks for a lost hint.
QUEUED_CHECKED = 16


class IngestState:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._claim = client.register_script(scripts.CLAIM_BATCH)
        self._claim_pooling = client.register_script(scripts.CLAIM_POOLING)
        self._queued = client.register_script(scripts.QUEUED_IN_STUDY)

    def hint(self, payload: dict[str, Any]) -> None:
        """Record an enqueued instance for batching, and as queued in its study (its pooling waits).

        An instance received again under another study (a study split or merged at the PACS) is no
        longer waited for by the study it left: its own settling only knows its new study."""
        sop, study = payload["sop_uid"], payload.get("study_uid") or ""
        before = self.payload(sop)
        left = (before or {}).get("study_uid") or ""
        pipe = self.r.pipeline()
        pipe.hset(self.keys.ingest_payload(), sop, json.dumps(payload))
        pipe.zadd(self.keys.ingest_pending(), {sop: payload["received_at"]})
        if left and left != study:
            pipe.zrem(self.keys.ingest_queued(left), sop)
        if study:
            pipe.zadd(self.keys.ingest_queued(study), {sop: payload["received_at"]})
        pipe.execute()

    def claim(self, sop_uid: str, others: int, now: float, lease_until: float, claimer: str) -> Claim:
        """Claim ``sop_uid`` and up to ``others`` pending instances until ``lease_until``.

        A claim made by the same ``claimer`` (the Celery task id) is this very message delivered
        again after its worker died: taken over.
        """
        k = self.keys
        res = self._claim(
            keys=[k.ingest_pending(), k.ingest_payload(), k.ingest_claim()],
            args=[sop_uid, max(0, others), now, lease_until, claimer],
        )
        if int(res[0]) == 0:
            return Claim([], busy_until=float(res[1]))
        # res[1] is the instance's own payload ("" when its hint was lost), then the others'.
        return Claim([json.loads(raw) for raw in res[1:] if raw])

    def release(self, sop_uids: list[str]) -> None:
        if sop_uids:
            self.r.hdel(self.keys.ingest_claim(), *sop_uids)

    def done(self, sop_uid: str, study_uid: str, pipe: redis.client.Pipeline | None = None) -> None:
        """Forget an instance's hint and payload, and that its study waits for it (it is settled);
        with ``pipe``, queued on the caller's transaction."""
        own = self.r.pipeline() if pipe is None else pipe
        own.hdel(self.keys.ingest_payload(), sop_uid)
        own.zrem(self.keys.ingest_pending(), sop_uid)
        if study_uid:
            own.zrem(self.keys.ingest_queued(study_uid), sop_uid)
        if pipe is None:
            own.execute()

    def queued_in_study(self, study_uid: str) -> tuple[int, float]:
        """(how many of the study's instances are received and not yet settled, the latest reception
        time among them): a study pooled before they are settled would be pooled again as each comes,
        its first study code made from part of it. Costs the same for a study of 30,000 slices as for
        one image (the previous release's set was read whole, each payload decoded)."""
        k = self.keys
        n, latest = self._queued(
            keys=[k.ingest_queued(study_uid), k.ingest_payload(), k.ingest_queued_before(study_uid)],
            args=[QUEUED_CHECKED],
        )
        return int(n), float(latest)

    def pending_among(self, sop_uids: list[str]) -> set[str]:
        """The instances among ``sop_uids`` whose hint waits to be claimed: the next model batch
        takes the oldest of them with its own instance. (One claimed by a batch that failed, or by
        a worker that died, is no longer pending: only its own message brings it back.)"""
        if not sop_uids:
            return set()
        scores = self.r.zmscore(self.keys.ingest_pending(), sop_uids)
        return {uid for uid, score in zip(sop_uids, scores, strict=True) if score is not None}

    def payload(self, sop_uid: str) -> dict[str, Any] | None:
        raw = self.r.hget(self.keys.ingest_payload(), sop_uid)
        return json.loads(raw) if raw else None

    def pending_count(self) -> int:
        return int(self.r.zcard(self.keys.ingest_pending()))

    # -- decode crash counts -----------------------------------------------------------------------
    def decode_started(self, sop_uid: str) -> int:
        """Count a decode as started; returns how many earlier ones never finished (crashes)."""
        return int(self.r.hincrby(self.keys.ingest_decoding(), sop_uid, 1)) - 1

    def decode_finished(self, sop_uid: str) -> None:
        self.r.hdel(self.keys.ingest_decoding(), sop_uid)

    # -- study pooling ---------------------------------------------------------------------------------
    def pool_due(self, study_uid: str, due_at: float) -> None:
        """The study is to be pooled at ``due_at`` (or later, if it already was due later)."""
        self.r.zadd(self.keys.pool_due(), {study_uid: due_at}, gt=True)

    def claim_due_studies(self, now: float, lease_seconds: float, limit: int = 100) -> list[str]:
        """Due studies nobody is pooling, now leased to the caller until ``now + lease_seconds``."""
        k = self.keys
        res = self._claim_pooling(keys=[k.pool_due(), k.pool_running()], args=[now, now + lease_seconds, limit])
        return [uid.decode() if isinstance(uid, bytes) else str(uid) for uid in res]

    def pool_finished(self, study_uid: str) -> None:
        """The pooling of the study is done (or not needed yet): its lease is released."""
        self.r.zrem(self.keys.pool_running(), study_uid)

    def pool_retry_later(self, study_uid: str, at: float) -> None:
        """A pooling that failed: keep the study leased until ``at``, then it is due again."""
        self.r.zadd(self.keys.pool_running(), {study_uid: at}, xx=True)

    def pool_pending(self) -> tuple[int, int]:
        """(studies waiting to be stable or claimed, studies being pooled)."""
        pipe = self.r.pipeline()
        pipe.zcard(self.keys.pool_due())
        pipe.zcard(self.keys.pool_running())
        due, running = pipe.execute()
        return int(due), int(running)
