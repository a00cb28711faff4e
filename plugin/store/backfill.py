"""Progress of ``drh-pacs backfill orthanc``, so an interrupted run resumes where it stopped.

Per Orthanc URL (keyed by a short hash of it): a hash (url, source_ae, last_run, done, finished,
``walked``: a whole walk of the archive has finished, ``since``: the last Orthanc change already
reconciled, ``last_ok``, ``last_error``) and the set of Orthanc study IDs done by the walk.
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
        """Forget everything: the next run walks the whole archive again."""
        self.r.delete(self.done_key)
        self.r.hdel(self.key, "since", "walked")

    def walked(self) -> bool:
        return self.r.hget(self.key, "walked") == b"1"

    def set_walked(self) -> None:
        self.r.hset(self.key, "walked", 1)

    def since(self) -> int | None:
        """The last Orthanc change reconciled; None until a run has started following the change log."""
        raw = self.r.hget(self.key, "since")
        return int(raw) if raw is not None else None

    def set_since(self, seq: int) -> None:
        self.r.hset(self.key, "since", int(seq))

    def outcome(self, error: str = "") -> None:
        """How the last run ended (an empty error: it succeeded), for the status page and alerts."""
        now = time.time()
        if error:
            self.r.hset(self.key, mapping={"last_error": error[:500], "last_error_at": now})
        else:
            self.r.hset(self.key, mapping={"last_ok": now, "last_error": ""})

    def info(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(self.key).items()}

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
