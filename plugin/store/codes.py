"""Binary codes in Redis: fixed-width slots per (model version, level), and the change logs replicas follow.

Layout (names in :mod:`plugin.store.keys`): the codes of one (version, level) are one string of
fixed-width slots; ``slot``/``uid`` hashes map UIDs to slots and back; a tombstone bitmap marks
deleted slots; ``slotsn`` points each slot at its study's filter record
(:mod:`plugin.store.attributes`); a stream logs every change.

Upserts are idempotent by UID: writing the same UID again reuses its slot, and writing the same
code again changes nothing and logs nothing. A deleted UID's slot is tombstoned (never reused until
:meth:`CodeStore.compact` renumbers the live slots, keeping their order, and bumps the generation).

Change logs. Every write that a replica must see appends to a stream, in the same Lua script or
transaction as the write (:mod:`plugin.store.scripts`): ``set`` (slot, uid, code, sn), ``del`` (slot,
uid), ``link`` (slot, sn) to ``ns:log:{v}:{lv}``, and (sn, rec) to ``ns:attrlog``. A replica loads one
consistent snapshot (one MULTI) with the last entry id of each stream, then applies the entries after
it. Streams are capped near :data:`LOG_MAXLEN` entries; a replica that finds its last entry trimmed
away reloads. Each model's logs start with an ``init`` entry, so a replica's position is always a
real entry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import redis

from plugin.store import scripts
from plugin.store.attributes import ATTR_DTYPE, ATTR_SIZE
from plugin.store.keys import Keys
from plugin.store.models import LEVELS, LOG_MAXLEN, ModelRegistry, StoreError

# How long a compaction may hold its (version, level); writers wait at most this long.
COMPACT_LOCK_SECONDS = 600
# A DICOM UID has at most 64 characters: a replica's UID array starts this wide (wider if needed).
UID_WIDTH = 64
# Fields per HSCAN call when a replica reads every slot's UID (a few ms of Redis time each).
UID_SCAN_CHUNK = 20_000


@dataclass
class Snapshot:
    """One consistent copy of a (version, level) for a replica's bulk load (see :meth:`CodeStore.snapshot`)."""

    version: str
    level: str
    nbits: int
    generation: int
    n_slots: int
    codes: bytes  # n_slots * nbytes
    rerank: np.ndarray  # int8 (n_slots, rerank_dim): the re-ranking vectors (zeros where none was stored)
    slot_sn: np.ndarray  # uint32 (n_slots,)
    deleted: np.ndarray  # bool (n_slots,)
    attrs: np.ndarray  # ATTR_DTYPE (n_studies + 1,), index = study number
    log_pos: str
    attr_pos: str
    uids: np.ndarray  # bytes "S<width>" (n_slots,): each slot's UID, b"" where none (deleted)


@dataclass
class Changes:
    """What happened after a replica's positions (see :meth:`CodeStore.changes`)."""

    active: str | None
    generation: int
    log: list[tuple[str, dict[bytes, bytes]]]
    attrs: list[tuple[str, dict[bytes, bytes]]]
    log_lost: bool  # the replica's last log entry was trimmed away: it must reload
    attr_lost: bool


def wait_while_compacting(what: str) -> Iterator[int]:
    """Attempts of a write that a compaction may turn away: waits, up to the lock's lifetime."""
    deadline = time.monotonic() + COMPACT_LOCK_SECONDS
    attempt = 0
    while True:
        yield attempt
        attempt += 1
        if time.monotonic() > deadline:
            raise StoreError(f"{what} stayed locked by a compaction for {COMPACT_LOCK_SECONDS} s")
        time.sleep(min(0.2, 0.01 * attempt))


class CodeStore:
    """Codes of every (version, level). Thread-safe like its client."""

    def __init__(self, client: redis.Redis, keys: Keys, models: ModelRegistry) -> None:
        self.r = client
        self.keys = keys
        self.models = models
        self._upsert = client.register_script(scripts.UPSERT_CODE)
        self._delete = client.register_script(scripts.DELETE_CODE)
        self._unlock = client.register_script(scripts.UNLOCK)

    def _code_keys(self, version: str, level: str) -> list[str]:
        if level not in LEVELS:
            raise StoreError(f"unknown level {level!r}")
        k = self.keys
        return [
            k.codes(version, level),
            k.next(version, level),
            k.slot(version, level),
            k.uid(version, level),
            k.tomb(version, level),
            k.log(version, level),
        ]

    # -- writes ------------------------------------------------------------------------------------
    def upsert(
        self,
        version: str,
        level: str,
        uid: str,
        code: bytes | np.ndarray,
        *,
        study_uid: str | None = None,
        rerank: bytes | np.ndarray | None = None,
    ) -> tuple[int, bool]:
        """Store ``code`` (packed bytes) for ``uid``; returns (slot, changed).

        ``study_uid`` (image level) links the slot to its study for filtering at once; without it
        the link comes from the instance record (``Records.put_instance``), before or after this call.
        ``rerank`` is the slot's re-ranking vector: the version's ``rerank_dim`` int8 values
        (:func:`hashing.bits.quantize_rerank`).
        """
        nbytes = self.models.nbytes(version)
        data = bytes(np.asarray(code, dtype=np.uint8).ravel()) if not isinstance(code, bytes) else code
        if len(data) != nbytes:
            raise StoreError(f"code of {len(data)} bytes for a {nbytes * 8}-bit model {version}")
        rr = b"" if rerank is None else (rerank if isinstance(rerank, bytes) else np.asarray(rerank, np.int8).tobytes())
        if rr and len(rr) != self.models.rerank_dim(version):
            raise StoreError(
                f"re-ranking vector of {len(rr)} values; model {version} has {self.models.rerank_dim(version)}"
            )
        suid = uid if level == "study" else (study_uid or "")
        keys = [
            *self._code_keys(version, level),
            self.keys.slotsn(version, level),
            self.keys.sno(),
            self.keys.snext(),
            self.keys.instance(uid),
            self.keys.lock(version, level),
            self.keys.rerank(version, level),
        ]
        for _ in wait_while_compacting(f"{version}/{level}"):
            slot, changed = self._upsert(keys=keys, args=[uid, data, nbytes, suid, LOG_MAXLEN, rr])
            if int(slot) >= 0:
                return int(slot), bool(changed)
        raise AssertionError("unreachable")

    def delete(self, version: str, level: str, uid: str) -> int | None:
        """Tombstone ``uid``'s slot (a later upsert of the same UID takes a new slot)."""
        k = self._code_keys(version, level)
        for _ in wait_while_compacting(f"{version}/{level}"):
            slot = int(
                self._delete(keys=[k[2], k[3], k[4], k[5], self.keys.lock(version, level)], args=[uid, LOG_MAXLEN])
            )
            if slot != -2:
                return None if slot < 0 else slot
        raise AssertionError("unreachable")

    # -- reads -------------------------------------------------------------------------------------
    def get(self, version: str, level: str, uid: str) -> bytes | None:
        nbytes = self.models.nbytes(version)
        slot = self.r.hget(self.keys.slot(version, level), uid)
        if slot is None:
            return None
        s = int(slot)
        return self.r.getrange(self.keys.codes(version, level), s * nbytes, (s + 1) * nbytes - 1)

    def has(self, version: str, level: str, uid: str) -> bool:
        return bool(self.r.hexists(self.keys.slot(version, level), uid))

    def uids(self, version: str, level: str) -> set[str]:
        """Every UID with a live code (a full read: for maintenance jobs, not queries)."""
        return {m.decode() for m in self.r.hkeys(self.keys.slot(version, level))}

    def count(self, version: str, level: str) -> int:
        """Live codes (allocated slots minus deleted ones)."""
        return int(self.r.hlen(self.keys.slot(version, level)))

    def tombstones(self, version: str, level: str) -> int:
        return int(self.r.bitcount(self.keys.tomb(version, level)))

    def slots_of(self, version: str, level: str, uids: Sequence[str]) -> list[int | None]:
        """Slots of UIDs (None for a UID without a live code)."""
        if not uids:
            return []
        raw = self.r.hmget(self.keys.slot(version, level), list(uids))
        return [None if v is None else int(v) for v in raw]

    def uids_of(self, version: str, level: str, slots: Sequence[int]) -> list[str | None]:
        """UIDs of slots (None for a deleted or unallocated slot)."""
        if not len(slots):
            return []
        raw = self.r.hmget(self.keys.uid(version, level), [int(s) for s in slots])
        return [None if v is None else v.decode() for v in raw]

    def uid_table(self, version: str, level: str, n_slots: int) -> np.ndarray:
        """Every slot's UID as one fixed-width bytes array (b"" for a deleted or unallocated slot),
        for a replica that answers with UIDs from memory.

        Read in chunks (HSCAN): one HGETALL of a million fields would hold Redis up for a second,
        and workers with it. Not one instant: a slot's UID never changes within a generation, but
        one deleted meanwhile may be missing; the caller checks the generation afterwards
        (:meth:`snapshot`).
        """
        slots: list[np.ndarray] = []
        values: list[bytes] = []
        cursor = 0
        while True:
            cursor, chunk = self.r.hscan(self.keys.uid(version, level), cursor, count=UID_SCAN_CHUNK)
            slots.append(np.fromiter(map(int, chunk.keys()), np.int64, len(chunk)))
            values.extend(chunk.values())
            if cursor == 0:
                break
        width = max(UID_WIDTH, max(map(len, values), default=0))
        out = np.zeros(n_slots, f"S{width}")
        at = np.concatenate(slots)
        if values:
            keep = at < n_slots  # a slot allocated after the snapshot comes with its log entry
            out[at[keep]] = np.array(values, f"S{width}")[keep]
        return out

    # -- compaction --------------------------------------------------------------------------------
    def compact(self, version: str, level: str) -> int:
        """Renumber the live slots densely (keeping their order) and drop tombstones.

        Returns the number of slots reclaimed. Writers to this (version, level) are held off by a
        lock key for the duration (their upserts wait and retry, see :meth:`upsert`), so the copy is
        of a quiet state and nothing written meanwhile is lost; the lock has a lifetime, so a
        compaction that dies does not block ingest for good. Replicas see the new generation and
        reload. Other versions and levels are not affected.
        """
        k = self.keys
        nbytes = self.models.nbytes(version)
        log = k.log(version, level)
        lock = k.lock(version, level)
        token = f"{os.getpid()}-{time.time_ns()}"
        if not self.r.set(lock, token, nx=True, ex=COMPACT_LOCK_SECONDS):
            raise StoreError(f"a compaction of {version}/{level} is already running")
        try:
            with self.r.pipeline() as pipe:
                # Every write appends to the log; WATCH is the proof that none slipped in.
                pipe.watch(log)
                codes = pipe.get(k.codes(version, level)) or b""
                slotsn = pipe.get(k.slotsn(version, level)) or b""
                rr = pipe.get(k.rerank(version, level)) or b""
                uid_map = pipe.hgetall(k.uid(version, level))
                n_slots = int(pipe.get(k.next(version, level)) or 0)
                old = np.fromiter(sorted(int(s) for s in uid_map), np.int64, len(uid_map))
                code_arr = np.frombuffer(codes.ljust(n_slots * nbytes, b"\0"), np.uint8).reshape(n_slots, nbytes)
                sn_arr = np.frombuffer(slotsn.ljust(n_slots * 4, b"\0"), "<u4")[:n_slots]
                rr_arr = _rerank_array(rr, n_slots, self.models.rerank_dim(version))
                uids = [uid_map[str(s).encode()] for s in old.tolist()]
                pipe.multi()
                pipe.set(k.codes(version, level), code_arr[old].tobytes())
                pipe.set(k.slotsn(version, level), sn_arr[old].astype("<u4").tobytes())
                pipe.set(k.rerank(version, level), rr_arr[old].tobytes())
                pipe.delete(k.slot(version, level), k.uid(version, level), k.tomb(version, level), log)
                for start in range(0, len(uids), 10_000):
                    chunk = range(start, min(start + 10_000, len(uids)))
                    pipe.hset(k.slot(version, level), mapping={uids[i]: i for i in chunk})
                    pipe.hset(k.uid(version, level), mapping={i: uids[i] for i in chunk})
                pipe.set(k.next(version, level), len(uids))
                pipe.incr(k.gen(version, level))
                pipe.xadd(log, {"op": "init"}, maxlen=LOG_MAXLEN, approximate=True)
                pipe.execute()
                return n_slots - len(uids)
        except redis.WatchError as exc:  # a write that ignored the lock: refuse rather than lose it
            raise StoreError(f"{version}/{level} changed during compaction; nothing was changed") from exc
        finally:
            # Release only our own lock (it may have expired and been taken by another run).
            self._unlock(keys=[lock], args=[token])

    # -- replica support ---------------------------------------------------------------------------
    def snapshot(self, version: str, level: str) -> Snapshot:
        """Everything a replica needs: one MULTI for the arrays, so that they are one consistent
        state, then every slot's UID (:meth:`uid_table`), read again if a compaction renumbered the
        slots meanwhile."""
        k = self.keys
        nbytes = self.models.nbytes(version)
        for _ in range(5):
            pipe = self.r.pipeline(transaction=True)
            pipe.get(k.gen(version, level))
            pipe.get(k.next(version, level))
            pipe.get(k.codes(version, level))
            pipe.get(k.slotsn(version, level))
            pipe.get(k.tomb(version, level))
            pipe.xrevrange(k.log(version, level), count=1)
            pipe.get(k.sattr())
            pipe.xrevrange(k.attrlog(), count=1)
            pipe.get(k.rerank(version, level))
            gen, nxt, codes, slotsn, tomb, last, sattr, alast, rr = pipe.execute()
            n = int(nxt or 0)
            uids = self.uid_table(version, level, n)
            if int(self.r.get(k.gen(version, level)) or 0) == int(gen or 0):
                break
        else:
            raise StoreError(f"{version}/{level} kept being compacted while a replica loaded it")
        codes = (codes or b"").ljust(n * nbytes, b"\0")[: n * nbytes]
        slot_sn = np.frombuffer((slotsn or b"").ljust(n * 4, b"\0")[: n * 4], "<u4").astype(np.uint32)
        deleted = np.unpackbits(np.frombuffer((tomb or b"").ljust((n + 7) // 8, b"\0"), np.uint8))[:n].astype(bool)
        sattr = sattr or b""
        attrs = np.frombuffer(sattr[: len(sattr) // ATTR_SIZE * ATTR_SIZE], ATTR_DTYPE).copy()
        return Snapshot(
            version=version,
            level=level,
            nbits=nbytes * 8,
            generation=int(gen or 0),
            n_slots=n,
            codes=codes,
            rerank=_rerank_array(rr or b"", n, self.models.rerank_dim(version)),
            slot_sn=slot_sn,
            deleted=deleted,
            attrs=attrs,
            log_pos=last[0][0].decode() if last else "0-0",
            attr_pos=alast[0][0].decode() if alast else "0-0",
            uids=uids,
        )

    def changes(
        self, version: str, level: str, log_pos: str, attr_pos: str, count: int = 50_000, route: str | None = None
    ) -> Changes:
        """Entries after the given positions (at most ``count`` each), in one round trip, and the
        version now answering for ``route`` (see :meth:`ModelRegistry.active`).

        Also says whether the entries at the positions still exist: when one was trimmed away,
        entries after it may be lost too, and the replica must reload.
        """
        k = self.keys
        pipe = self.r.pipeline(transaction=True)  # one instant: generation and log agree
        pipe.hget(k.routes(), route or "")  # the route's version, in the same round trip
        pipe.get(k.gen(version, level))
        pipe.xrange(k.log(version, level), min=f"({log_pos}", count=count)
        pipe.xrange(k.log(version, level), min=log_pos, max=log_pos)
        pipe.xrange(k.attrlog(), min=f"({attr_pos}", count=count)
        pipe.xrange(k.attrlog(), min=attr_pos, max=attr_pos)
        answering, gen, log, here, attrs, ahere = pipe.execute()
        # No route named, or none recorded yet (an installation from before routes): ask the registry.
        active = answering.decode() if answering and route else self.models.active(route)
        return Changes(
            active=active,
            generation=int(gen or 0),
            log=[(i.decode(), f) for i, f in log],
            attrs=[(i.decode(), f) for i, f in attrs],
            log_lost=log_pos != "0-0" and not here,
            attr_lost=attr_pos != "0-0" and not ahere,
        )


def _rerank_array(raw: bytes, n_slots: int, width: int) -> np.ndarray:
    """The re-ranking vectors of ``n_slots`` slots as int8 ``(n_slots, width)``, zeros where none."""
    return np.frombuffer(raw.ljust(n_slots * width, b"\0")[: n_slots * width], np.int8).reshape(n_slots, width)
