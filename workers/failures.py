"""The failure ledger: instances that could not be indexed, why, and a way to try them again.

Kept in Redis so every worker writes to it and every status page reads it:

==============================  =====  ==========================================================
``ns:failures``                 hash   SOPInstanceUID -> JSON {reason, kind (permanent, transient
                                       that outlived its retries, or error: a bug), first_seen,
                                       last_seen, count, state (failed|retrying), and the task
                                       payload: study_uid, path, source_ae, received_at}
``ns:failures:recent``          zset   SOPInstanceUID by last_seen (newest first for status pages)
``ns:ignored``                  hash   SOPInstanceUID -> JSON {reason, study_uid, when}: non-image
                                       objects, accepted and deliberately not indexed
==============================  =====  ==========================================================

A retry re-queues the original task payload (the file is still on the spool) and marks the entry
``retrying``; a success removes the entry, a new failure bumps ``count`` and ``last_seen``. Reasons
carry no patient data: they come from our decode errors, which name tags and codes, not values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis


class FailureLedger:
    """Read and write the ledger; cheap to construct (holds only a client and a namespace)."""

    def __init__(self, client: redis.Redis, namespace: str = "drh") -> None:
        self.r = client
        self.ns = namespace
        self.key = f"{namespace}:failures"
        self.recent = f"{namespace}:failures:recent"
        self.ignored_key = f"{namespace}:ignored"

    def record(self, payload: dict[str, Any], reason: str, kind: str = "permanent") -> dict[str, Any]:
        """Add or update the entry of ``payload['sop_uid']``; returns the entry."""
        sop = payload["sop_uid"]
        now = time.time()
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.key)
                    raw = pipe.hget(self.key, sop)
                    entry = json.loads(raw) if raw else {"first_seen": now, "count": 0}
                    entry.update({k: payload[k] for k in ("sop_uid", "study_uid", "path", "source_ae", "received_at")})
                    entry.update(reason=reason, kind=kind, last_seen=now, count=entry["count"] + 1, state="failed")
                    pipe.multi()
                    pipe.hset(self.key, sop, json.dumps(entry))
                    pipe.zadd(self.recent, {sop: now})
                    pipe.execute()
                    return entry
                except redis.exceptions.WatchError:
                    continue

    def resolve(self, sop_uid: str) -> bool:
        """Forget an entry (the instance is now indexed or ignored); True when there was one."""
        pipe = self.r.pipeline()
        pipe.hdel(self.key, sop_uid)
        pipe.zrem(self.recent, sop_uid)
        removed, _ = pipe.execute()
        return bool(removed)

    def get(self, sop_uid: str) -> dict[str, Any] | None:
        raw = self.r.hget(self.key, sop_uid)
        return json.loads(raw) if raw else None

    def count(self) -> int:
        return int(self.r.hlen(self.key))

    def list(self, limit: int = 50) -> list[dict[str, Any]]:
        """The ``limit`` most recent failures, newest first."""
        uids = [u.decode() for u in self.r.zrevrange(self.recent, 0, max(0, limit - 1))]
        if not uids:
            return []
        return [json.loads(raw) for raw in self.r.hmget(self.key, uids) if raw]

    def all_uids(self) -> list[str]:
        return [u.decode() for u in self.r.hkeys(self.key)]

    def record_ignored(self, payload: dict[str, Any], reason: str) -> None:
        entry = {"reason": reason, "study_uid": payload["study_uid"], "when": time.time()}
        self.r.hset(self.ignored_key, payload["sop_uid"], json.dumps(entry))

    def ignored_count(self) -> int:
        return int(self.r.hlen(self.ignored_key))

    def retry(self, celery_app: Any, sop_uid: str) -> bool:
        """Re-queue one failed instance; False when it is not in the ledger.

        The received_at of the original arrival is kept, so the task is not mistaken for a duplicate
        of a newer arrival; a failed instance is never marked indexed, so it will run.
        """
        entry = self.get(sop_uid)
        if entry is None:
            return False
        from workers.app import enqueue_instance

        entry["state"] = "retrying"
        entry["retried_at"] = time.time()
        self.r.hset(self.key, sop_uid, json.dumps(entry))
        # The worker treats a "failed" instance as settled (so a redelivery does not fail it twice):
        # say that this one is to be done again.
        self.r.hset(f"{self.ns}:instance:{sop_uid}", "state", "retrying")
        enqueue_instance(
            celery_app,
            sop_uid=sop_uid,
            study_uid=entry["study_uid"],
            path=entry["path"],
            source_ae=entry.get("source_ae", ""),
            received_at=float(entry.get("received_at", 0.0)),
        )
        return True

    def retry_all(self, celery_app: Any) -> int:
        return sum(self.retry(celery_app, uid) for uid in self.all_uids())


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs failures [list | retry UID | retry --all]``."""
    from plugin.settings import SettingsError, load_settings
    from workers.app import EnqueueError, make_celery, redis_for

    parser = argparse.ArgumentParser(prog="drh-pacs failures", description="list or retry failed instances")
    sub = parser.add_subparsers(dest="cmd")
    ls = sub.add_parser("list", help="recent failures, newest first")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rt = sub.add_parser("retry", help="re-queue failed instances")
    rt.add_argument("uid", nargs="?", help="SOPInstanceUID to retry")
    rt.add_argument("--all", action="store_true", help="retry every failed instance")
    args = parser.parse_args(argv)
    try:
        app = make_celery(load_settings())
    except (SettingsError, RuntimeError) as exc:
        print(f"drh-pacs failures: {exc}", file=sys.stderr)
        return 2
    ledger = FailureLedger(redis_for(app), app.drh_settings.redis_namespace)
    try:
        if args.cmd in (None, "list"):
            limit = getattr(args, "limit", 50)
            entries = ledger.list(limit)
            if getattr(args, "json", False):
                print(json.dumps(entries, indent=2))
                return 0
            print(f"{ledger.count()} failed instance(s), {ledger.ignored_count()} ignored non-image object(s)")
            for e in entries:
                print(
                    f"{e['sop_uid']}  {e['state']:<8} {e['kind']:<9} x{e['count']:<3} "
                    f"first {_fmt_time(e['first_seen'])}  last {_fmt_time(e['last_seen'])}\n    {e['reason']}"
                )
            return 0
        if args.all:
            n = ledger.retry_all(app)
            print(f"re-queued {n} instance(s)")
            return 0
        if not args.uid:
            parser.error("retry needs a SOPInstanceUID or --all")
        if not ledger.retry(app, args.uid):
            print(f"drh-pacs failures: {args.uid} is not in the failure ledger", file=sys.stderr)
            return 1
        print(f"re-queued {args.uid}")
        return 0
    except (redis.exceptions.RedisError, EnqueueError) as exc:
        print(f"drh-pacs failures: Redis or broker unavailable: {exc}", file=sys.stderr)
        return 1
