"""Which workers are alive, which are not, and which device and model each of their processes loaded.

Two hashes, read whole by the status (never a key scan, which would walk every instance key):
``ns:workers`` (hostname -> JSON heartbeat, refreshed every :data:`HEARTBEAT_SECONDS` by the worker's
main process, see :mod:`workers.app`) and ``ns:workerprocs`` ("hostname|pid" -> the device and model
a pool process loaded, see :mod:`workers.model`).

A heartbeat carries the worker's ``state``: ``starting`` (checking its device), ``online``,
``refused`` (its device is unusable: it takes no task; ``reason`` says why) or ``stopped`` (it exited
cleanly). A worker that stops beating without saying so (killed, its machine gone) keeps its last
record: readers show it **offline** with its last-seen time (:func:`worker_state`) rather than
letting it vanish. Records are forgotten :data:`FORGET_SECONDS` after they were last refreshed.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from plugin.store.keys import Keys

# Seconds between worker heartbeats; readers treat a worker silent for three periods as offline.
HEARTBEAT_SECONDS = 10.0
# A worker silent (or stopped) this long is forgotten: replaced long ago, or retired.
FORGET_SECONDS = 7 * 24 * 3600.0


def worker_state(record: dict[str, Any], now: float) -> str:
    """``online``, ``starting``, ``refused``, ``stopped`` or ``offline`` (silent for three periods)."""
    state = str(record.get("state") or "online")
    if state == "stopped":
        return state
    if now - float(record.get("last_seen", 0)) > 3 * HEARTBEAT_SECONDS:
        return "offline"
    return state


class WorkerRegistry:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys

    def beat(self, record: dict[str, Any]) -> None:
        self.r.hset(self.keys.workers(), record["hostname"], json.dumps(record))

    def remove(self, hostname: str) -> None:
        self.r.hdel(self.keys.workers(), hostname)

    def forget_silent(self, now: float, older_than: float = FORGET_SECONDS) -> list[str]:
        """Drop the records of workers not heard of for ``older_than`` seconds; returns their names."""
        gone = [h for h, w in self.heartbeats().items() if now - float(w.get("last_seen", 0)) > older_than]
        if gone:
            self.r.hdel(self.keys.workers(), *gone)
        return gone

    def forget_processes(self, hostname: str) -> None:
        """Drop the device records of a worker's previous run (its pool processes are gone)."""
        key = self.keys.worker_procs()
        stale = [f for f in self.r.hkeys(key) if f.decode().split("|", 1)[0] == hostname]
        if stale:
            self.r.hdel(key, *stale)

    def record_process(self, hostname: str, pid: int, record: dict[str, Any]) -> None:
        """A model a pool process loaded, and on which device: one record per model, as a process
        serves every route's model (each load replaced the last, and the status named one model)."""
        field = f"{hostname}|{pid}|{record.get('model', '')}"
        self.r.hset(self.keys.worker_procs(), field, json.dumps(record))

    def heartbeats(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self.r.hgetall(self.keys.workers()).items()}

    def processes(self) -> dict[str, list[dict[str, Any]]]:
        """hostname -> the records of its pool processes."""
        out: dict[str, list[dict[str, Any]]] = {}
        for k, v in self.r.hgetall(self.keys.worker_procs()).items():
            out.setdefault(k.decode().split("|", 1)[0], []).append(json.loads(v))
        return out
