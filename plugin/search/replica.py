"""The query process's in-memory replica of the codes of one level, and search over it.

Why a replica: a similar-studies query must scan every code of the active model; doing that in
Redis would ship the whole code string per query. The replica holds the codes as 64-bit word
planes, one row per store slot, with what filters need and each slot's UID
(:mod:`plugin.search.state`): a search needs no round trip to Redis once its reference's variants
are in. No readable patient ID sits in its memory (no million Python strings either). Which slots
a filtered search may return is :mod:`plugin.search.eligible`.

Sync. The first :meth:`ReplicaIndex.refresh` (and one after a model switch, a compaction, or a log
trimmed past our position) loads a consistent snapshot in one MULTI; every later refresh reads the
change-log entries after the replica's position in one round trip and applies them. With nothing
new that is one pipelined round trip, cheap enough to do before every query. A reload builds the
new state aside and swaps it in, so the old version answers until the new one is ready; a query does
not wait for a reload another thread is running (:data:`QUERY_REFRESH_WAIT`).

Concurrency. Searches and the application of changes are serialised by a lock; reloads (the slow
part) run outside it.

Freshness. A search answers from the replica as of its last refresh: its UIDs are those of its own
slots, so a compaction in Redis meanwhile changes nothing it returns, and a code deleted after that
refresh can still be returned. A served query therefore refreshes first
(:func:`plugin.search.query.run_similar`): what was deleted before the query arrived is never
answered. (Until this release each search turned its hits into UIDs with a round trip to Redis, which
also caught a deletion in the few milliseconds of the search itself; that round trip was a fifth of a
served search at 1M.)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from hashing.bits import Reranker
from hashing.search import (
    MultiIndexHash,
    Planner,
    Selector,
    knn_rows,
    query_words,
    radius,
    rerank_shortlist,
    shortlist_size,
)
from plugin.search.eligible import Eligibility
from plugin.search.filters import Filters
from plugin.search.state import NEVER, State, words_of
from plugin.store import ATTR_DTYPE, FLAG_KNOWN, LEVELS, Store, patient_key

log = logging.getLogger(__name__)

# From this many codes on a replica keeps multi-index tables. Below, the scan has the better tail:
# at 1M clustered codes and k = 11, tables p50 / p99 0.77 / 1.90 ms against the scan's 1.06 / 1.26
# (with 10k codes not yet in the tables, as between rebuilds: 1.31 / 2.82 against 0.96 / 1.51); at
# 2M the tables win (0.64 / 2.31 against 2.04 / 2.71), at 4M by far (0.72 / 3.34 against 4.70 / 6.47).
MIH_MIN = 2_000_000

# How long a query waits for another thread's refresh of a replica before answering from the state
# loaded (:meth:`ReplicaIndex.refresh`): an incremental refresh takes about a millisecond, a reload
# seconds.
QUERY_REFRESH_WAIT = 0.05


class IndexNotReady(RuntimeError):
    """No model is active yet, or the replica has not loaded."""


@dataclass(frozen=True)
class Hit:
    uid: str
    distance: int
    similarity: float | None = None  # the re-ranking score (cosine of the re-ranking vectors)


class ReplicaIndex:
    """Replica of the codes of ``level`` for the model version answering for ``route`` (None: the
    store's only or general route, :meth:`plugin.store.models.ModelRegistry.active`).

    ``mih_min``: from this many codes on, exact k-NN goes through multi-index hashing (built at
    load and rebuilt when ``mih_rebuild_fraction`` of the rows have changed since), falling back to
    the scan when the table lookups pass ``mih_budget`` of the rows (:class:`hashing.search.Planner`);
    below it, and for selective filters, a full scan is faster.
    """

    def __init__(
        self,
        store: Store,
        level: str,
        *,
        route: str | None = None,
        mih_min: int = MIH_MIN,
        mih_rebuild_fraction: float = 0.05,
        mih_rebuild_min: int = 10_000,
        mih_budget: float = 0.02,
        batch: int = 50_000,
    ) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}")
        self.store = store
        self.level = level
        self.route = route
        self.mih_min = mih_min
        self.mih_rebuild_fraction = mih_rebuild_fraction
        self.mih_rebuild_min = mih_rebuild_min
        self.mih_budget = mih_budget
        self.batch = batch
        self._state: State | None = None
        self._lock = threading.RLock()  # state mutation and search
        self._refresh_lock = threading.Lock()  # one refresher at a time
        self._selector = Selector()
        self._reranker = Reranker()
        self._eligibility = Eligibility(level, store.records.vocabulary)
        self._planner = Planner(budget_fraction=mih_budget)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- properties ----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._state is not None

    @property
    def version(self) -> str | None:
        st = self._state
        return st.version if st else None

    @property
    def nbits(self) -> int | None:
        st = self._state
        return st.nbits if st else None

    @property
    def generation(self) -> int | None:
        st = self._state
        return st.generation if st else None

    def __len__(self) -> int:
        st = self._state
        return st.live if st else 0

    def memory_bytes(self) -> int:
        """Bytes held by the replica's arrays (capacity, not just the live part), its cached filter
        results included."""
        st = self._state
        return (st.memory_bytes() if st is not None else 0) + self._eligibility.nbytes

    # -- sync ----------------------------------------------------------------------------------
    def refresh(self, wait: float | None = None) -> bool:
        """Bring the replica up to date with the store (bulk load, or incremental); False when it
        did not, because another refresh held it longer than ``wait`` seconds.

        A query passes ``wait`` (:data:`QUERY_REFRESH_WAIT`): another thread's incremental refresh
        takes a millisecond, worth waiting for, but a reload after a model switch or a compaction
        takes seconds at a million codes (the UIDs are read again), and meanwhile the loaded state
        answers. A replica with nothing loaded yet always waits: it has nothing to answer with.
        """
        if wait is not None and self._state is not None:
            if not self._refresh_lock.acquire(timeout=wait):
                return False
        else:
            self._refresh_lock.acquire()
        try:
            self._refresh_locked()
        finally:
            self._refresh_lock.release()
        return True

    def _refresh_locked(self) -> None:
        st = self._state
        if st is None:
            version = self.store.models.active(self.route)
            if version is not None:
                self._load(version)
            return
        while True:
            ch = self.store.codes.changes(
                st.version, self.level, st.log_pos, st.attr_pos, count=self.batch, route=self.route
            )
            if ch.active is None:
                return
            if ch.active != st.version or ch.generation != st.generation or ch.log_lost or ch.attr_lost:
                log.info(
                    "replica %s reloads: version %s -> %s, generation %s -> %s, log trimmed %s",
                    self.level,
                    st.version,
                    ch.active,
                    st.generation,
                    ch.generation,
                    ch.log_lost or ch.attr_lost,
                )
                self._load(ch.active)
                return
            if not ch.log and not ch.attrs:
                break
            with self._lock:
                self._apply(st, ch.log, ch.attrs)
            if len(ch.log) < self.batch and len(ch.attrs) < self.batch:
                break
        self._maybe_rebuild_mih(st)

    def _load(self, version: str) -> None:
        snap = self.store.codes.snapshot(version, self.level)
        st = State(version, self.level, snap.nbits, snap.generation, snap.rerank.shape[1])
        n = snap.n_slots
        st.reserve(n)
        if n:
            st.planes[:, :n] = words_of(snap.codes, st.nbytes)
            st.rerank[:n] = snap.rerank
            st.exclude[:n] = np.where(snap.deleted, NEVER, 0).astype(np.uint8)
            st.slot_sn[:n] = snap.slot_sn
            st.put_uids(slice(0, n), snap.uids)
        st.n = n
        st.live = int(n - np.count_nonzero(snap.deleted))
        # Slots may name studies that have no record yet (no put_study): they stay zero (unknown).
        st.reserve_studies(max(len(snap.attrs), int(snap.slot_sn.max(initial=0)) + 1))
        st.attrs.put(slice(0, len(snap.attrs)), snap.attrs)
        if self.level == "study" and n:
            live = np.flatnonzero(~snap.deleted)
            st.sn_slot[st.slot_sn[live]] = live
        st.log_pos, st.attr_pos = snap.log_pos, snap.attr_pos
        if n >= self.mih_min:
            st.mih = MultiIndexHash(st.nbits).build(np.frombuffer(snap.codes, np.uint8).reshape(n, st.nbytes))
        with self._lock:
            self._state = st
        log.info("replica %s loaded model %s: %d codes (%d slots)", self.level, version, st.live, n)

    def _apply(self, st: State, entries: list, attr_entries: list) -> None:
        codes: dict[int, bytes] = {}
        uids: dict[int, bytes] = {}
        reranks: dict[int, bytes] = {}
        sns: dict[int, int] = {}
        dead: dict[int, bool] = {}
        before = st.n  # slots known before this batch
        for entry_id, f in entries:
            st.log_pos = entry_id
            op = f.get(b"op")
            if op == b"set":
                s = int(f[b"slot"])
                codes[s] = f[b"code"]
                uids[s] = f[b"uid"]
                if f.get(b"rr"):
                    reranks[s] = f[b"rr"]
                sns[s] = int(f[b"sn"])
                dead[s] = False
            elif op == b"del":
                s = int(f[b"slot"])
                dead[s] = True
                uids[s] = b""  # a deleted study's UID is not kept in memory
            elif op == b"link":
                sns[int(f[b"slot"])] = int(f[b"sn"])
        if codes:
            slots = np.fromiter(codes, np.int64, len(codes))
            need = int(slots.max()) + 1
            st.reserve(need)
            st.planes[:, slots] = words_of(b"".join(codes.values()), st.nbytes)
            if reranks:
                rr_slots = np.fromiter(reranks, np.int64, len(reranks))
                st.rerank[rr_slots] = np.frombuffer(b"".join(reranks.values()), np.int8).reshape(len(reranks), -1)
            st.n = max(st.n, need)
            if st.mih is not None:
                st.mih.invalidate(slots)
            if st.mih is not None or st.building:
                st.changed_since_build.append(slots)
        if sns:
            slots = np.fromiter(sns, np.int64, len(sns))
            st.reserve(int(slots.max()) + 1)
            values = np.fromiter(sns.values(), np.uint32, len(sns))
            known = slots < before
            if bool(np.any(st.slot_sn[slots[known]] != values[known])):
                st.slots_version += 1
            st.slot_sn[slots] = values
            st.reserve_studies(int(values.max()) + 1)
        if uids:
            slots = np.fromiter(uids, np.int64, len(uids))
            st.reserve(int(slots.max()) + 1)
            st.put_uids(slots, list(uids.values()))
        if dead:
            slots = np.fromiter(dead, np.int64, len(dead))
            st.reserve(int(slots.max()) + 1)
            was_live = st.exclude[slots] == 0
            st.exclude[slots] = np.where(np.fromiter(dead.values(), bool, len(dead)), NEVER, 0).astype(np.uint8)
            st.live += int(np.count_nonzero(st.exclude[slots] == 0)) - int(np.count_nonzero(was_live))
            if bool(np.any(was_live & (st.exclude[slots] != 0))):
                st.deletions += 1
        if self.level == "study":
            for s in set(sns) | set(dead):
                sn = int(st.slot_sn[s])
                if st.exclude[s] == 0:
                    st.sn_slot[sn] = s
                elif st.sn_slot[sn] == s:
                    st.sn_slot[sn] = -1
        if attr_entries:
            recs: dict[int, bytes] = {}
            for entry_id, f in attr_entries:
                st.attr_pos = entry_id
                if b"sn" in f:
                    recs[int(f[b"sn"])] = f[b"rec"]
            if recs:
                sn = np.fromiter(recs, np.int64, len(recs))
                st.reserve_studies(int(sn.max()) + 1)
                st.put_attrs(sn, np.frombuffer(b"".join(recs.values()), ATTR_DTYPE))

    def _maybe_rebuild_mih(self, st: State) -> None:
        """Rebuild the multi-index tables in a background thread when enough rows are scanned
        outside them (added or changed since the last build); searches go on meanwhile."""
        n = st.n
        if n < self.mih_min or st.building:
            return
        if st.mih is not None and st.mih.pending(n) <= max(self.mih_rebuild_min, self.mih_rebuild_fraction * n):
            return
        with self._lock:
            st.building = True
            marker = len(st.changed_since_build)
            codes = np.ascontiguousarray(st.planes[:, :n].T).view(np.uint8)[:, : st.nbytes]

        def build() -> None:
            try:
                mih = MultiIndexHash(st.nbits).build(codes)
                with self._lock:
                    # Rows changed while building have stale entries in the new tables.
                    for rows in st.changed_since_build[marker:]:
                        mih.invalidate(rows)
                    st.changed_since_build = []
                    st.mih = mih
                log.info("replica %s: multi-index tables rebuilt over %d rows", self.level, n)
            except Exception:
                log.exception("replica %s: multi-index rebuild failed; the scan answers meanwhile", self.level)
            finally:
                st.building = False

        threading.Thread(target=build, name=f"mih-{self.level}", daemon=True).start()

    def start(self, interval: float = 0.5) -> None:
        """Refresh from a background thread every ``interval`` seconds (until :meth:`close`)."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.refresh()
                except Exception:  # keep following the store; the next round retries
                    log.exception("replica %s refresh failed", self.level)
                self._stop.wait(interval)

        self._thread = threading.Thread(target=loop, name=f"replica-{self.level}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # -- queries -------------------------------------------------------------------------------
    def code_of(self, uid: str) -> bytes | None:
        """The code of ``uid`` in the replica (None when it has none, or it is deleted)."""
        found = self.lookup(uid)
        return None if found is None else found[0]

    def lookup(self, uid: str) -> tuple[bytes, np.ndarray] | None:
        """The code and re-ranking vector of ``uid`` (None when it has none, or it is deleted)."""
        st = self._state
        if st is None:
            return None
        (slot,) = self.store.codes.slots_of(st.version, self.level, [uid])
        with self._lock:
            if slot is None or slot >= st.n or st.exclude[slot]:
                return None
            return st.code(slot), st.rerank[slot].copy()

    def search(
        self,
        query: bytes,
        k: int,
        *,
        max_distance: int | None = None,
        filters: Filters | None = None,
        exclude_patient: str | None = None,
        exclude_uids: Collection[str] = (),
        rerank: np.ndarray | Future[np.ndarray] | None = None,
    ) -> list[Hit]:
        """The k nearest codes by Hamming distance, ordered by (distance, slot).

        Ties go to the code stored first (lower slot), the same in every replica. With
        ``max_distance``, only codes within it. Filters, ``exclude_patient`` (a PatientID whose
        studies are left out) and ``exclude_uids`` restrict the set *before* selection, so the
        answer is the k nearest among the codes that pass.

        With ``rerank`` (the query's re-ranking vector), the :func:`hashing.search.rerank_shortlist`
        nearest by (distance, slot) are re-sorted by the cosine of their re-ranking vectors, highest
        first (equal scores keep their (distance, slot) order), and the first k returned: no answer is
        decided by arrival order within a tie of Hamming distances. With several vectors ``(V, d)``,
        the query's variants (:mod:`hashing.variants`), the larger tolerant shortlist is re-sorted by
        each candidate's best cosine to any of them.

        ``rerank`` may be a :class:`~concurrent.futures.Future` of either (the reference's variants
        still on their way from Redis, :func:`plugin.search.query.fetch_reranking`): the scan runs
        meanwhile for the larger shortlist, and its first rows are the smaller one's when only one
        vector comes, since both are in (distance, slot) order. Its error is the search's.
        """
        excluded = set(exclude_uids)
        pending = rerank if isinstance(rerank, Future) else None
        if rerank is None:
            want = k
        elif pending is not None:
            want = shortlist_size(k, tolerant=True)  # the larger one; cut if a single vector comes
        else:
            want = rerank_shortlist(k, rerank)
        resolved: np.ndarray | None = None
        for attempt in range(3):
            st = self._state
            if st is None:
                raise IndexNotReady(f"the {self.level} index is not loaded (no active model yet?)")
            if len(query) != st.nbytes:
                raise ValueError(f"query code of {len(query)} bytes for a {st.nbits}-bit model")
            if pending is None:
                _check_rerank(st, rerank)
            with self._lock:
                # Excluded UIDs (the reference) are dropped once the rows are UIDs: asking for
                # len(excluded) more keeps exactly the k nearest of the others, without a lookup
                # of their slots first.
                rows, dist = self._search_rows(
                    st, bytes(query), want + len(excluded), max_distance, filters, exclude_patient
                )
            if pending is not None:
                resolved = pending.result() if resolved is None else resolved  # outside the lock:
                _check_rerank(st, resolved)  # a slow Redis holds up this query only
                cut = rerank_shortlist(k, resolved) + len(excluded)
                rows, dist = rows[:cut], dist[:cut]
            vectors = resolved if pending is not None else rerank
            sims = None
            with self._lock:  # the reranker's buffers are the replica's; an apply may grow the arrays
                if vectors is not None:
                    sims = self._reranker.similarity(vectors, st.rerank, rows)
                    keep = np.argsort(-sims, kind="stable")[: k + len(excluded)]
                    rows, dist, sims = rows[keep], dist[keep], sims[keep]
                uids = st.uids_at(rows)
            if all(uids) or attempt == 2:
                return _hits(uids, dist, sims, excluded, k)
            # A slot without a UID: deleted by a refresh since the scan, or while the replica
            # loaded (its deletion is in the log): catch up and search again.
            self.refresh(wait=QUERY_REFRESH_WAIT)
        raise AssertionError("unreachable")

    def radius_search(self, query: bytes, r: int, *, filters: Filters | None = None) -> list[Hit]:
        """Every code within distance ``r``, nearest first (for a bounded answer use search)."""
        st = self._state
        if st is None:
            raise IndexNotReady(f"the {self.level} index is not loaded")
        with self._lock:
            exclude, _ = self._eligibility.rows(st, filters)
            rows, dist = radius(st.planes[:, : st.n], query_words(query), r, exclude=exclude)
            uids = st.uids_at(rows)
        return [Hit(u, int(d)) for u, d in zip(uids, dist.tolist(), strict=True) if u]

    def _search_excluding_patient(
        self, st: State, query: bytes, k: int, max_distance: int | None, patient_id: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Everyone's studies but one patient's (the usual "priors of other patients" query).

        Almost every study passes, so instead of a mask over all studies: ask for a few more than
        k, drop the hits of that patient (and of studies without a record), and ask for four times
        more while too few remain. Exact: the hits kept are in (distance, slot) order, and any
        passing code not among the candidates comes after all of them.
        """
        key = np.uint64(patient_key(patient_id))
        exclude = st.exclude[: st.n] if st.live < st.n else None
        planes = st.planes[:, : st.n]
        want = k + 8
        while True:
            rows, dist = self._planner.knn(
                planes,
                st.mih,
                query,
                want,
                nbits=st.nbits,
                exclude=exclude,
                max_distance=max_distance,
                selector=self._selector,
            )
            sn = st.slot_sn[rows]
            ok = (st.attrs["patient"][sn] != key) & ((st.attrs["flags"][sn] & FLAG_KNOWN) != 0)
            if int(np.count_nonzero(ok)) >= k or rows.size < want:
                return rows[ok][:k], dist[ok][:k]
            want *= 4

    def _search_rows(
        self,
        st: State,
        query: bytes,
        k: int,
        max_distance: int | None,
        filters: Filters | None,
        exclude_patient: str | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if st.n == 0 or k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if exclude_patient and (filters is None or not filters.restricts()):
            return self._search_excluding_patient(st, query, k, max_distance, exclude_patient)
        exclude, rows = self._eligibility.rows(st, filters, exclude_patient)
        planes = st.planes[:, : st.n]
        if rows is not None:
            # Selective filter (one patient, a rare body part): distances of those rows only.
            return knn_rows(planes, rows, query_words(query), k, max_distance=max_distance)
        return self._planner.knn(
            planes,
            st.mih,
            query,
            k,
            nbits=st.nbits,
            exclude=exclude,
            max_distance=max_distance,
            selector=self._selector,
        )


def _check_rerank(st: State, rerank: np.ndarray | None) -> None:
    if rerank is not None and np.shape(rerank)[-1] != st.rerank_dim:
        raise ValueError(f"re-ranking vector of {np.shape(rerank)[-1]} values; the model has {st.rerank_dim}")


def _hits(uids: list[str], dist: np.ndarray, sims: np.ndarray | None, excluded: set[str], k: int) -> list[Hit]:
    """Candidates in answer order (re-ranked when ``sims`` is given), excluded ones and slots
    without a UID left out."""
    order = range(len(uids)) if sims is None else np.argsort(-sims, kind="stable").tolist()
    out = []
    for i in order:
        uid = uids[i]
        if not uid or uid in excluded:
            continue
        out.append(Hit(uid, int(dist[i]), None if sims is None else float(sims[i])))
        if len(out) == k:
            break
    return out
