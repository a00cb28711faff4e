"""The state of a re-index job, shared by the workers that run it and the status that shows it.

``ns:reindex`` holds version, path, previous, state (planning|running|finishing|complete|failed),
started, finished, total, done, failed, planned (1 once every batch is queued) and studies_done;
``ns:reindex:done`` is the set of SOPInstanceUIDs re-encoded (a set: a redelivered batch cannot
count twice) and ``ns:reindex:failed`` maps the ones that could not be (file gone, decode error...)
to their reason. The job itself is :mod:`workers.reindex`; starting one is :mod:`plugin.ops.reindex`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

import redis

from plugin.store.keys import Keys

ACTIVE_STATES = frozenset({"planning", "running", "finishing"})


class ReindexJob:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys

    def get(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.keys.reindex()).items()}

    def running_version(self) -> str | None:
        """The version being built while a job is active (None when none is)."""
        job = self.get()
        return job.get("version") if job.get("state") in ACTIVE_STATES else None

    def start(self, version: str, path: str, previous: str) -> None:
        """Forget any earlier job and record a new one in state ``planning``."""
        pipe = self.r.pipeline()
        pipe.delete(self.keys.reindex(), self.keys.reindex_done(), self.keys.reindex_failed())
        pipe.hset(
            self.keys.reindex(),
            mapping={
                "version": version,
                "path": path,
                "previous": previous,
                "state": "planning",
                "started": time.time(),
                "total": 0,
                "done": 0,
                "failed": 0,
                "planned": 0,
            },
        )
        pipe.execute()

    def update(self, fields: Mapping[str, str | int | float]) -> None:
        self.r.hset(self.keys.reindex(), mapping=dict(fields))

    def claim_finish(self) -> bool:
        """True for the one caller that gets to queue the finishing step."""
        return bool(self.r.hsetnx(self.keys.reindex(), "finish_queued", 1))

    def mark_done(self, sop_uids: Iterable[str]) -> None:
        uids = list(sop_uids)
        if uids:
            self.r.sadd(self.keys.reindex_done(), *uids)

    def mark_failed(self, sop_uid: str, reason: str) -> None:
        self.r.hset(self.keys.reindex_failed(), sop_uid, reason)

    def is_done(self, sop_uid: str) -> bool:
        return bool(self.r.sismember(self.keys.reindex_done(), sop_uid))

    def done_uids(self) -> set[str]:
        return {m.decode() for m in self.r.smembers(self.keys.reindex_done())}

    def failed_uids(self) -> set[str]:
        return {m.decode() for m in self.r.hkeys(self.keys.reindex_failed())}

    def counts(self) -> tuple[int, int]:
        """(done, failed)."""
        pipe = self.r.pipeline()
        pipe.scard(self.keys.reindex_done())
        pipe.hlen(self.keys.reindex_failed())
        done, failed = pipe.execute()
        return int(done), int(failed)
