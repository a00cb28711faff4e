"""Progress of ``drh-pacs backfill orthanc``, so an interrupted run resumes where it stopped.

Per Orthanc URL (keyed by a short hash of it): a hash (url, source_ae, last_run, done, finished)
and the set of Orthanc study IDs already done.
"""

from __future__ import annotations

import hashlib
import time

import redis

from plugin.store.keys import Keys


class BackfillProgress:
    def __init__(self, client: redis.Redis, keys: Keys, url: str) -> None:
        self.r = client
        self.url = url.rstrip("/")
        url_id = hashlib.sha1(self.url.encode()).hexdigest()[:12]
        self.key = keys.backfill(url_id)
        self.done_key = keys.backfill_done(url_id)

    def restart(self) -> None:
        self.r.delete(self.done_key)

    def started(self, source_ae: str) -> None:
        self.r.hset(self.key, mapping={"url": self.url, "source_ae": source_ae, "last_run": time.time()})

    def is_done(self, orthanc_id: str) -> bool:
        return bool(self.r.sismember(self.done_key, orthanc_id))

    def mark_done(self, orthanc_id: str) -> None:
        self.r.sadd(self.done_key, orthanc_id)

    def done_count(self) -> int:
        return int(self.r.scard(self.done_key))

    def finished(self) -> None:
        self.r.hset(self.key, mapping={"done": self.done_count(), "finished": time.time()})
