"""The query process's in-memory replica of the codes of one level, and search over it.

Why a replica: a similar-studies query must scan every code of the active model; doing that in
Redis would ship the whole code string per query. The replica holds the codes as 64-bit word
planes (:mod:`hashing.search`), one row per store slot, plus per-slot the study number and per study
the 24-byte filter record (:data:`plugin.store.ATTR_DTYPE`). No UID and no readable patient ID sit
in its memory (no ten million Python strings either): hits are turned back into UIDs with one HMGET
to the store.

Sync. The first :meth:`ReplicaIndex.refresh` (and one after a model switch, a compaction, or a log
trimmed past our position) loads a consistent snapshot in one MULTI; every later refresh reads the
change-log entries after the replica's position in one round trip and applies them. With nothing
new that is one pipelined round trip, cheap enough to do before every query. A reload builds the
new state aside and swaps it in, so the old version answers until the new one is ready.

Concurrency. Searches and the application of changes are serialised by a lock; reloads (the slow
part) run outside it. When a hit's slot turns out to be deleted in Redis, or the store was compacted
under us, the search refreshes and runs again rather than answer from stale slots.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from hashing.search import MultiIndexHash, Planner, Selector, knn_rows, n_words, query_words, radius, to_words
from plugin.store import ATTR_DTYPE, FLAG_KNOWN, LEVELS, MODALITY_BITS, CodeStore, parse_date, patient_key

log = logging.getLogger(__name__)

NEVER = np.uint8(255)

# From this many codes on a replica keeps multi-index tables (below, the scan is as fast).
MIH_MIN = 300_000


class IndexNotReady(RuntimeError):
    """No model is active yet, or the replica has not loaded."""


@dataclass(frozen=True)
class Hit:
    uid: str
    distance: int


@dataclass(frozen=True)
class SearchFilters:
    """Restrictions on the *study* attributes (for the image level: the image's study).

    Dates are DICOM ``YYYYMMDD``, inclusive. ``modalities``: the study has at least one of them.
    A study whose attributes are not known yet never passes a filter.
    """

    modalities: set[str] | None = None
    date_from: str | None = None
    date_to: str | None = None
    body_part: str | None = None
    patient_id: str | None = None
    exclude_patient_id: str | None = None

    def is_empty(self) -> bool:
        return not (
            self.modalities
            or self.date_from
            or self.date_to
            or self.body_part
            or self.patient_id
            or self.exclude_patient_id
        )


class _Columns:
    """Study filter records (:data:`plugin.store.ATTR_DTYPE`) as one array per field."""

    FIELDS = ATTR_DTYPE.names

    def __init__(self, size: int) -> None:
        self.size = size
        self.cols = {f: np.zeros(size, ATTR_DTYPE[f].newbyteorder("=")) for f in self.FIELDS}

    def grown(self, size: int) -> _Columns:
        out = _Columns(size)
        for f in self.FIELDS:
            out.cols[f][: self.size] = self.cols[f]
        return out

    def put(self, sn: np.ndarray | slice, records: np.ndarray) -> None:
        for f in self.FIELDS:
            self.cols[f][sn] = records[f]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cols.values())


class _State:
    """One loaded (version, generation): arrays indexed by slot, grown by doubling."""

    def __init__(self, version: str, level: str, nbits: int, generation: int) -> None:
        self.version = version
        self.level = level
        self.nbits = nbits
        self.nbytes = nbits // 8
        self.generation = generation
        self.n = 0  # slots known (allocated) so far
        self.live = 0
        self.planes = np.zeros((n_words(nbits), 0), np.uint64)
        self.exclude = np.zeros(0, np.uint8)  # 0 live, 255 deleted / unknown
        self.slot_sn = np.zeros(0, np.intp)
        # Study records as columns (a strided field of a 24-byte record compares several times slower).
        self.attrs = _Columns(1)
        # Study level only (one slot per study): study number -> slot, -1 for none. Lets a
        # selective filter go from the few passing studies straight to their slots.
        self.sn_slot = np.full(1, -1, np.int64)
        self.log_pos = "0-0"
        self.attr_pos = "0-0"
        self.mih: MultiIndexHash | None = None
        self.building = False  # a rebuild of the tables is running
        self.changed_since_build: list[np.ndarray] = []

    def reserve(self, n: int) -> None:
        cap = self.exclude.shape[0]
        if n <= cap:
            return
        new = max(n, cap * 2, 1024)
        planes = np.zeros((self.planes.shape[0], new), np.uint64)
        planes[:, :cap] = self.planes
        exclude = np.full(new, NEVER, np.uint8)
        exclude[:cap] = self.exclude
        slot_sn = np.zeros(new, np.intp)
        slot_sn[:cap] = self.slot_sn
        self.planes, self.exclude, self.slot_sn = planes, exclude, slot_sn

    def reserve_studies(self, n: int) -> None:
        if n > self.attrs.size:
            size = max(n, self.attrs.size * 2, 1024)
            self.attrs = self.attrs.grown(size)
            sn_slot = np.full(size, -1, np.int64)
            sn_slot[: self.sn_slot.shape[0]] = self.sn_slot
            self.sn_slot = sn_slot

    def code(self, slot: int) -> bytes:
        return np.ascontiguousarray(self.planes[:, slot]).view(np.uint8)[: self.nbytes].tobytes()


def _words_of(codes: bytes, nbytes: int) -> np.ndarray:
    """Packed codes (concatenated bytes) to (W, n) word planes."""
    n = len(codes) // nbytes
    return to_words(np.frombuffer(codes, np.uint8).reshape(n, nbytes))


class ReplicaIndex:
    """Replica of the codes of ``level`` for the store's active model version.

    ``mih_min``: from this many codes on, exact k-NN goes through multi-index hashing (built at
    load and rebuilt when ``mih_rebuild_fraction`` of the rows have changed since), falling back to
    the scan when the table lookups pass ``mih_budget`` of the rows (:class:`hashing.search.Planner`);
    below it, and for selective filters, a full scan is faster.
    """

    def __init__(
        self,
        store: CodeStore,
        level: str,
        *,
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
        self.mih_min = mih_min
        self.mih_rebuild_fraction = mih_rebuild_fraction
        self.mih_rebuild_min = mih_rebuild_min
        self.mih_budget = mih_budget
        self.batch = batch
        self._state: _State | None = None
        self._lock = threading.RLock()  # state mutation and search
        self._refresh_lock = threading.Lock()  # one refresher at a time
        self._selector = Selector()
        self._vocab: dict[tuple[str, str], int] = {}
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
        """Bytes held by the replica's arrays (capacity, not just the live part)."""
        st = self._state
        if st is None:
            return 0
        arrays = (st.planes, st.exclude, st.slot_sn, st.attrs, st.sn_slot)
        total = sum(a.nbytes for a in arrays)
        if st.mih is not None:
            total += sum(o.nbytes for o in st.mih._orders) + sum(o.nbytes for o in st.mih._offsets)
        return total

    # -- sync ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Bring the replica up to date with the store (bulk load, or incremental)."""
        with self._refresh_lock:
            st = self._state
            if st is None:
                version = self.store.active_version()
                if version is not None:
                    self._load(version)
                return
            while True:
                ch = self.store.changes(st.version, self.level, st.log_pos, st.attr_pos, count=self.batch)
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
        snap = self.store.snapshot(version, self.level)
        st = _State(version, self.level, snap.nbits, snap.generation)
        n = snap.n_slots
        st.reserve(n)
        if n:
            st.planes[:, :n] = _words_of(snap.codes, st.nbytes)
            st.exclude[:n] = np.where(snap.deleted, NEVER, 0).astype(np.uint8)
            st.slot_sn[:n] = snap.slot_sn
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

    def _apply(self, st: _State, entries: list, attr_entries: list) -> None:
        codes: dict[int, bytes] = {}
        sns: dict[int, int] = {}
        dead: dict[int, bool] = {}
        for entry_id, f in entries:
            st.log_pos = entry_id
            op = f.get(b"op")
            if op == b"set":
                s = int(f[b"slot"])
                codes[s] = f[b"code"]
                sns[s] = int(f[b"sn"])
                dead[s] = False
            elif op == b"del":
                dead[int(f[b"slot"])] = True
            elif op == b"link":
                sns[int(f[b"slot"])] = int(f[b"sn"])
        if codes:
            slots = np.fromiter(codes, np.int64, len(codes))
            need = int(slots.max()) + 1
            st.reserve(need)
            st.planes[:, slots] = _words_of(b"".join(codes.values()), st.nbytes)
            st.n = max(st.n, need)
            if st.mih is not None:
                st.mih.invalidate(slots)
            if st.mih is not None or st.building:
                st.changed_since_build.append(slots)
        if sns:
            slots = np.fromiter(sns, np.int64, len(sns))
            st.reserve(int(slots.max()) + 1)
            values = np.fromiter(sns.values(), np.uint32, len(sns))
            st.slot_sn[slots] = values
            st.reserve_studies(int(values.max()) + 1)
        if dead:
            slots = np.fromiter(dead, np.int64, len(dead))
            st.reserve(int(slots.max()) + 1)
            before = int(np.count_nonzero(st.exclude[slots] == 0))
            st.exclude[slots] = np.where(np.fromiter(dead.values(), bool, len(dead)), NEVER, 0).astype(np.uint8)
            st.live += int(np.count_nonzero(st.exclude[slots] == 0)) - before
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
                st.attrs.put(sn, np.frombuffer(b"".join(recs.values()), ATTR_DTYPE))

    def _maybe_rebuild_mih(self, st: _State) -> None:
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
        st = self._state
        if st is None:
            return None
        (slot,) = self.store.slots_of(st.version, self.level, [uid])
        with self._lock:
            if slot is None or slot >= st.n or st.exclude[slot]:
                return None
            return st.code(slot)

    def search(
        self,
        query: bytes,
        k: int,
        *,
        max_distance: int | None = None,
        filters: SearchFilters | None = None,
        exclude_uids: Collection[str] = (),
    ) -> list[Hit]:
        """The k nearest codes by Hamming distance, ordered by (distance, slot).

        Ties go to the code stored first (lower slot), the same in every replica. With
        ``max_distance``, only codes within it. Filters and ``exclude_uids`` restrict the set
        *before* selection, so the answer is the k nearest among the codes that pass.
        """
        excluded = set(exclude_uids)
        for attempt in range(3):
            st = self._state
            if st is None:
                raise IndexNotReady(f"the {self.level} index is not loaded (no active model yet?)")
            if len(query) != st.nbytes:
                raise ValueError(f"query code of {len(query)} bytes for a {st.nbits}-bit model")
            with self._lock:
                # Excluded UIDs (the reference) are dropped after the UID lookup: asking for
                # len(excluded) more keeps exactly the k nearest of the others, without a lookup
                # of their slots first.
                rows, dist = self._search_rows(st, bytes(query), k + len(excluded), max_distance, filters)
            gen, uids = self.store.resolve(st.version, self.level, rows.tolist())
            if gen == st.generation:
                stale = any(u is None for u in uids)
                if not stale or attempt == 2:
                    hits = [Hit(u, int(d)) for u, d in zip(uids, dist.tolist(), strict=True) if u is not None]
                    return [h for h in hits if h.uid not in excluded][:k]
            # Deleted or renumbered in Redis after our last refresh: catch up and search again.
            self.refresh()
        raise IndexNotReady(f"the {self.level} index keeps changing generation (compaction running?)")

    def radius_search(self, query: bytes, r: int, *, filters: SearchFilters | None = None) -> list[Hit]:
        """Every code within distance ``r``, nearest first (for a bounded answer use search)."""
        for _ in range(3):
            st = self._state
            if st is None:
                raise IndexNotReady(f"the {self.level} index is not loaded")
            with self._lock:
                exclude, _ = self._eligible(st, filters)
                rows, dist = radius(st.planes[:, : st.n], query_words(query), r, exclude=exclude)
            gen, uids = self.store.resolve(st.version, self.level, rows.tolist())
            if gen == st.generation:
                return [Hit(u, int(d)) for u, d in zip(uids, dist.tolist(), strict=True) if u is not None]
            self.refresh()
        raise IndexNotReady(f"the {self.level} index keeps changing generation (compaction running?)")

    def _search_excluding_patient(
        self, st: _State, query: bytes, k: int, max_distance: int | None, patient_id: str
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

    def _eligible(self, st: _State, filters: SearchFilters | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(exclude mask, rows) for a search: uint8 per slot, 0 where a slot may be returned
        (None: every slot may).

        ``rows``, when not None, lists every eligible slot (ascending): the filter is selective and
        only those rows need a distance.
        """
        n = st.n
        if filters is None or filters.is_empty():
            # Nothing deleted: no mask to OR into the distances.
            return (st.exclude[:n] if st.live < n else None), None
        kind, studies = self._passing_studies(st, filters)
        if kind == "but":
            # Every study but a few (another patient's priors): mark the slots of those few.
            exclude = st.exclude[:n].copy()
            exclude[self._slots_of_studies(st, studies)] = NEVER
            return exclude, None
        if kind == "only" and self.level == "study":
            rows = self._slots_of_studies(st, studies)
            return st.exclude[:n], np.sort(rows[st.exclude[rows] == 0])
        if kind == "only":
            ok = np.zeros(st.attrs.size, np.uint8)
            ok[studies] = 1
            studies = ok
        # 1 -> 0 (eligible), 0 -> 255 (never), then OR with deletions: three byte passes.
        mask = studies[st.slot_sn[:n]]
        np.subtract(mask, 1, out=mask)
        np.bitwise_or(mask, st.exclude[:n], out=mask)
        if np.count_nonzero(mask == 0) <= n // 16:
            return mask, np.flatnonzero(mask == 0)
        return mask, None

    def _slots_of_studies(self, st: _State, sns: np.ndarray) -> np.ndarray:
        """Slots (< n) whose study number is in ``sns`` (a short list)."""
        if self.level == "study":
            rows = st.sn_slot[sns]
            return rows[(rows >= 0) & (rows < st.n)]
        return np.flatnonzero(np.isin(st.slot_sn[: st.n], sns))

    def _search_rows(
        self,
        st: _State,
        query: bytes,
        k: int,
        max_distance: int | None,
        filters: SearchFilters | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if st.n == 0 or k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if (
            filters is not None
            and filters.exclude_patient_id
            and SearchFilters(exclude_patient_id=filters.exclude_patient_id) == filters
        ):
            return self._search_excluding_patient(st, query, k, max_distance, filters.exclude_patient_id)
        exclude, rows = self._eligible(st, filters)
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

    def _vocabulary(self, field: str, terms: list[str]) -> list[int | None]:
        """Vocabulary numbers, cached: a term's number never changes once given."""
        missing = [t for t in terms if (field, t) not in self._vocab]
        if missing:
            for term, number in zip(missing, self.store.vocabulary(field, missing), strict=True):
                if number is not None:
                    self._vocab[(field, term)] = number
        return [self._vocab.get((field, t)) for t in terms]

    def _passing_studies(self, st: _State, f: SearchFilters) -> tuple[str, np.ndarray]:
        """The studies whose record satisfies every filter, in the cheapest form:

        - ``("only", sns)``: few pass, their study numbers;
        - ``("but", sns)``: all pass except a few (only exclusion filters);
        - ``("mask", uint8 0/1 per study number)`` otherwise.

        A study without a record (metadata not written yet, or an image not yet linked to its
        study: study number 0) passes no filter, not even an exclusion: it cannot be shown not to be
        the excluded patient's. The most selective tests run first; once few studies remain, the
        others run on those only.
        """
        a = st.attrs
        tests: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = []
        if f.patient_id:
            key = np.uint64(patient_key(f.patient_id))
            tests.append(("patient", lambda c: c == key))
        if f.body_part:
            (number,) = self._vocabulary("body_part", [f.body_part.strip().upper()])
            body = number or -1
            tests.append(("body", lambda c: c == body))
        if f.modalities:
            numbers = self._vocabulary("modality", sorted({m.strip().upper() for m in f.modalities}))
            mask = 0
            for number in numbers:
                if number is not None:
                    mask |= 1 << min(number - 1, MODALITY_BITS - 1)
            tests.append(("modmask", lambda c: _any_bit(c, mask)))
        if f.date_from or f.date_to:
            lo = _filter_date(f.date_from) if f.date_from else 1
            hi = _filter_date(f.date_to) if f.date_to else 99991231
            span = np.uint32(max(hi - lo, 0)) if hi >= lo else None
            # lo <= date <= hi in one unsigned comparison (unknown dates are 0 and fall outside).
            tests.append(("date", lambda c: (c - np.int32(lo)).view(np.uint32) <= span if span is not None else c < 0))
        size = a.size
        key_out = np.uint64(patient_key(f.exclude_patient_id)) if f.exclude_patient_id else None
        if not tests:
            # Exclusion only: the excluded patient's studies and the unknown ones, usually few.
            assert key_out is not None
            out = np.logical_or(a["patient"] == key_out, (a["flags"] & FLAG_KNOWN) == 0)
            out[0] = True
            if np.count_nonzero(out) <= size // 64:
                return "but", np.flatnonzero(out)
            return "mask", np.logical_not(out, out=out).view(np.uint8)
        if key_out is not None:
            tests.append(("patient", lambda c: c != key_out))
        # Every include test fails on an unknown record (zero fields), so no flag test is needed.
        ok: np.ndarray | None = None
        idx: np.ndarray | None = None
        for field, test in tests:
            col = a[field]
            if idx is not None:
                idx = idx[test(col[idx])]
                continue
            passed = test(col)
            ok = passed if ok is None else np.logical_and(ok, passed, out=ok)
            if np.count_nonzero(ok) <= size // 16:
                idx = np.flatnonzero(ok)
        if idx is not None:
            return "only", idx
        assert ok is not None
        return "mask", ok.view(np.uint8)


def _any_bit(col: np.ndarray, mask: int) -> np.ndarray:
    """``(col & mask) != 0`` for a uint64 column, testing only the bytes that hold mask bits.

    Modality masks use a bit or two: a strided byte test reads the same memory but computes on a
    byte per row instead of eight, about twice as fast at a million studies.
    """
    if sys.byteorder != "little" or col.ndim != 1 or not col.flags.c_contiguous:
        return (col & np.uint64(mask)) != 0
    rows = col.view(np.uint8).reshape(-1, 8)
    out: np.ndarray | None = None
    for byte in range(8):
        m = (mask >> (8 * byte)) & 0xFF
        if m:
            hit = (rows[:, byte] & np.uint8(m)) != 0
            out = hit if out is None else np.logical_or(out, hit, out=out)
    return out if out is not None else np.zeros(col.shape[0], dtype=bool)


def _filter_date(value: str) -> int:
    date = parse_date(value)
    if not date:
        raise ValueError(f"a date filter must be YYYYMMDD, got {value!r}")
    return date
