"""Hamming search over packed binary codes: exact k-NN, radius search, multi-index hashing.

numpy plus a few compiled loops (:mod:`hashing.kernels`), no Redis: :mod:`plugin.search.replica` keeps the
replica of the store and calls these functions.

Layout. Codes arrive in the one format of :mod:`hashing.bits` (packed ``uint8``, ``(n, nbits // 8)``).
For search they are held as *word planes*: a C-contiguous ``uint64`` array of shape ``(W, n)`` with
``W = ceil(nbits / 64)``, so that one query is ``W`` streaming passes of XOR + popcount over
contiguous memory. The byte order inside a word does not matter: the popcount of a XOR is the same
whichever way the bytes are grouped, as long as database and query are grouped alike.

Selection. Distances are small integers (at most ``nbits``), so the k nearest are found by counting,
not sorting: guess a threshold ``t`` from the histogram of a strided sample of the distances (16,384
of them, a sixtieth of a full histogram pass at a million codes), collect the rows ``<= t`` in one
pass, and sort only them; when the guess gives too few or too many, one histogram pass over all
distances gives the exact ``t``. A full ``argpartition`` over a million distances costs ten times
more than this counting.

Kernels. Each pass over the codes is a compiled loop in :mod:`hashing.kernels`; numpy does the
rest, on the few candidate rows.

Order. Every result is ordered by ``(distance, row)``: ties go to the lower row. The replica's rows
are store slots, allocated in arrival order, so ties go to the code that was indexed first, and the
order survives compaction, which keeps slot order. Exact scan and multi-index hashing return the same
list for the same data, ties included.

Exclusion. Rows that must not be returned (deleted slots, rows failing a filter) are given as an
``exclude`` mask of ``uint8`` where 0 means "eligible" and 255 "never": it is OR-ed into the
distances, which keeps the scan branch-free (a distance is at most 128, so an excluded row reads 255
and is beyond every threshold). A filter on the rows' study comes as the same mask, made in slot
order by the replica (:mod:`plugin.search.eligible`): a lookup through each row's study inside the
scan was a gather per row, which does not vectorise. A range on a per-row key (a study date range new
to the query) comes as :class:`InRange` beside such a mask and is tested in the scan's last distance
pass, which spares the pass that would write the mask for one query and the scan's reading it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from hashing import kernels

# The served ranking re-sorts this many Hamming neighbours by their re-ranking vectors
# (hashing.bits.quantize_rerank): at least 300 (chosen on validation, hashing/weights/MODEL_CARD.md), and 4 k
# for larger k. A query re-ranked by its variants (hashing.variants) looks at 1,000: that key finds
# neighbours the codes rank further down (validation same-patient recall@10 0.152 from 300 codes, 0.177
# from 1,000, for v3's codes).
SHORTLIST = 300
TOLERANT_SHORTLIST = 1000


def shortlist_size(k: int, tolerant: bool = False) -> int:
    """How many Hamming neighbours the re-ranking looks at for an answer of ``k`` (``tolerant``: the
    query is re-ranked by its variants)."""
    return max(TOLERANT_SHORTLIST if tolerant else SHORTLIST, 4 * k)


def rerank_shortlist(k: int, rerank: np.ndarray) -> int:
    """The shortlist a query re-ranked by ``rerank`` looks at: one vector ``(d,)``, or the reference's
    variants ``(V, d)`` (the tolerant shortlist). One rule for the search and for what its answer says."""
    return shortlist_size(k, tolerant=np.ndim(rerank) == 2)


NEVER = np.uint8(255)


def n_words(nbits: int) -> int:
    return (nbits + 63) // 64


def to_words(codes: np.ndarray) -> np.ndarray:
    """Packed ``(n, nbytes)`` uint8 codes to word planes ``(W, n)`` uint64 (zero padded)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.ndim == 1:
        codes = codes[None, :]
    n, nbytes = codes.shape
    w = (nbytes + 7) // 8
    if nbytes != w * 8:
        padded = np.zeros((n, w * 8), dtype=np.uint8)
        padded[:, :nbytes] = codes
        codes = padded
    return np.ascontiguousarray(np.ascontiguousarray(codes).view(np.uint64).reshape(n, w).T)


def query_words(code: bytes | np.ndarray) -> np.ndarray:
    """One packed code (bytes or uint8 array) to its ``(W,)`` uint64 words."""
    arr = np.frombuffer(code, dtype=np.uint8) if isinstance(code, bytes | bytearray) else np.asarray(code, np.uint8)
    return to_words(arr.ravel())[:, 0].copy()


def distances(planes: np.ndarray, query: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Hamming distances (uint8) from ``query`` words to every column of ``planes (W, n)``."""
    w, n = planes.shape
    if out is None:
        out = np.empty(n, dtype=np.uint8)
    # Row by row: a replica's planes are a column slice of a larger buffer, not contiguous as a
    # whole when W > 1, but each row is (ascontiguousarray is then a no-op, never a copy).
    kernels.hamming_first(np.ascontiguousarray(planes[0]), np.uint64(query[0]), out)
    for j in range(1, w):
        kernels.hamming_add(np.ascontiguousarray(planes[j]), np.uint64(query[j]), out)
    return out


@dataclass(frozen=True)
class InRange:
    """Rows eligible where ``mask`` is 0 *and* ``key`` lies in ``[lo, hi]`` (both per row, in row
    order): an ``exclude`` that :func:`masked_distances` tests inside its distance pass.

    Why not a mask: the mask of a range new to each query ("studies before this one") would be built
    in a pass of its own over the key, written, and read back by the scan. At a million rows that
    pass and the scan's OR took p50 1.38 ms, the fused pass 1.14 (2-core development machine).
    """

    mask: np.ndarray  # uint8 per row, 0 eligible (the rest of the filter, deletions)
    key: np.ndarray  # integer per row (a study date as YYYYMMDD)
    lo: int
    hi: int

    def at(self, rows: np.ndarray) -> np.ndarray:
        """The exclusion bytes (0 eligible, 255 never) of the given rows."""
        key = self.key[rows]
        return self.mask[rows] | np.where((key >= self.lo) & (key <= self.hi), 0, 255).astype(np.uint8)


Exclusion = np.ndarray | InRange


def excluded_at(exclude: Exclusion, rows: np.ndarray) -> np.ndarray:
    """``exclude``'s bytes (0 eligible, 255 never) at ``rows``, whichever form it has."""
    return exclude.at(rows) if isinstance(exclude, InRange) else exclude[rows]


def masked_distances(
    planes: np.ndarray, query: np.ndarray, out: np.ndarray | None = None, *, exclude: Exclusion | None = None
) -> np.ndarray:
    """:func:`distances`, with 255 wherever ``exclude`` says never."""
    if not isinstance(exclude, InRange):
        dist = distances(planes, query, out)
        if exclude is not None:
            np.bitwise_or(dist, exclude[: planes.shape[1]], out=dist)
        return dist
    w, n = planes.shape
    dist = distances(planes[: w - 1], query, out) if w > 1 else (np.empty(n, np.uint8) if out is None else out)
    kernels.hamming_in_range(
        np.ascontiguousarray(planes[w - 1]), np.uint64(query[w - 1]), w > 1,
        exclude.mask[:n], exclude.key[:n], int(exclude.lo), int(exclude.hi), dist,
    )  # fmt: skip
    return dist


def _order(rows: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort candidate rows by (distance, row); rows are < 2**40."""
    key = dist.astype(np.int64) << 40 | rows.astype(np.int64)
    key.sort()
    return key & ((1 << 40) - 1), key >> 40


@dataclass
class Selector:
    """Picks the k smallest distances by counting, reusing buffers between queries.

    The threshold is guessed from a strided sample of the distances, generously (twice the rows
    needed, and a few samples more): usually one collecting pass then yields between k and
    max(64 k, 8,192) candidates, and only those are sorted. When it gives too few (or too many),
    one histogram pass gives the exact k-th distance. The guess is per query: a threshold carried
    over from the previous query missed whenever the two asked for different k (a 10-answer query
    after a 300-row re-ranking shortlist) or fell in neighbourhoods of different density.
    Not thread-safe: one per searching thread (the replica searches under its lock).
    """

    SAMPLE = 16_384
    _dist: np.ndarray | None = None
    _hist: np.ndarray | None = None

    def dist_buffer(self, n: int) -> np.ndarray:
        """A uint8 distance buffer of n, kept between queries (fresh pages cost page faults)."""
        if self._dist is None or self._dist.shape[0] < n:
            self._dist = np.empty(max(n, 1024), np.uint8)
        return self._dist[:n]

    def _at_most(self, dist: np.ndarray, cap: int) -> np.ndarray:
        """``counts[t]`` = how many of ``dist`` are ``<= t``, for t up to ``cap`` (one histogram pass)."""
        if self._hist is None:
            self._hist = np.zeros(256, np.int64)
        kernels.histogram(dist, self._hist)
        return np.cumsum(self._hist[: cap + 1])

    def _kth(self, dist: np.ndarray, k: int, cap: int) -> tuple[int, int]:
        """(smallest t <= cap with at least k distances <= t, or cap; how many are <= t)."""
        counts = self._at_most(dist, cap)
        t = min(cap, int(np.searchsorted(counts, k)))
        return t, int(counts[t])

    def _guess(self, dist: np.ndarray, k: int, cap: int) -> int:
        """A threshold that probably has between k and max(64 k, 8,192) distances at or below it."""
        step = max(1, dist.shape[0] // self.SAMPLE)
        counts = self._at_most(dist[::step], cap)
        # each sample stands for `step` rows: ask the sample for twice the rows needed, plus a few
        return min(cap, int(np.searchsorted(counts, 2 * k / step + 4)))

    def select(self, dist: np.ndarray, k: int, max_distance: int | None, nbits: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and distances of the k nearest in ``dist`` (255 = excluded), ordered by (distance, row)."""
        n = dist.shape[0]
        cap = nbits if max_distance is None else min(max_distance, nbits)
        if k <= 0 or n == 0 or cap < 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        t = self._guess(dist, k, cap)
        rows = np.empty(max(64 * k, 8192), np.int64)
        found = kernels.rows_at_most(dist, np.uint8(t), rows)
        if found < 0 or (found < k and t < cap):
            # The sample was unlucky: too loose a threshold, or too tight.
            t, found = self._kth(dist, k, cap)
            rows = np.empty(found, np.int64)
            kernels.rows_at_most(dist, np.uint8(t), rows)
        rows, d = _order(rows[:found], dist[rows[:found]])
        return rows[:k], d[:k]


def knn(
    planes: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    nbits: int,
    exclude: Exclusion | None = None,
    max_distance: int | None = None,
    selector: Selector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest columns of ``planes`` by Hamming distance, ordered by (distance, row).

    ``exclude``: uint8 per row, 0 eligible, 255 never returned, or an :class:`InRange`. ``max_distance``:
    also a radius cap.
    """
    selector = selector or Selector()
    dist = masked_distances(planes, query, selector.dist_buffer(planes.shape[1]), exclude=exclude)
    return selector.select(dist, k, max_distance, nbits)


def knn_rows(
    planes: np.ndarray,
    rows: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    max_distance: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest among the given ascending ``rows`` only (a selective filter).

    Gathers those columns, then cuts at the k-th distance by counting before sorting the few
    that remain, as :class:`Selector` does for a full scan.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0 or k <= 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    d = distances(np.ascontiguousarray(planes[:, rows]), query)
    cap = int(d.max()) if max_distance is None else max_distance
    if rows.size > k:
        counts = np.cumsum(np.bincount(d, minlength=cap + 1)[: cap + 1])
        cap = min(cap, int(np.searchsorted(counts, k)))
    keep = np.flatnonzero(d <= cap)
    r, dd = _order(rows[keep], d[keep])
    return r[:k], dd[:k]


def radius(
    planes: np.ndarray,
    query: np.ndarray,
    r: int,
    *,
    exclude: Exclusion | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All rows within Hamming distance ``r`` (inclusive), ordered by (distance, row)."""
    dist = masked_distances(planes, query, exclude=exclude)
    rows = np.flatnonzero(dist <= r)
    return _order(rows, dist[rows])


def brute_force(codes: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference k-NN on packed uint8 codes by bytes and a full stable sort: slow, obviously right."""
    codes = np.asarray(codes, dtype=np.uint8)
    q = np.asarray(query, dtype=np.uint8).ravel()
    d = np.bitwise_count(codes ^ q[None, :]).sum(axis=1, dtype=np.int64)
    order = np.lexsort((np.arange(len(d)), d))[:k]
    return order.astype(np.int64), d[order]


# -- multi-index hashing ---------------------------------------------------------------------------


def _flip_masks(bits: int, s: int) -> np.ndarray:
    """All ``bits``-bit integers with exactly ``s`` bits set (the XOR masks of a radius-s shell)."""
    out = [sum(1 << b for b in combo) for combo in combinations(range(bits), s)]
    return np.asarray(out, dtype=np.int64)


class MultiIndexHash:
    """Exact k-NN by multi-index hashing (Norouzi, Punjani and Fleet, CVPR 2012 / TPAMI 2014).

    The code is cut into ``m`` disjoint substrings, each with a table from substring value to rows
    (a CSR: rows sorted by value, and offsets). A code within distance ``R`` of the query has, by
    pigeonhole, one substring within ``floor(R / m)``; searching substring radius ``s`` in the first
    ``j`` tables (``s - 1`` in the others) finds every code within ``m * s + j - 1``. The search
    widens shell by shell and stops as soon as the k-th best candidate lies inside that guaranteed
    radius, so the answer equals the exact scan's, ties included.

    The tables are static: :meth:`build` over rows ``[0, n)``. Rows added afterwards (``>= n``) and
    rows whose code changed (:meth:`invalidate`) are scanned exactly at each query; the replica
    rebuilds the tables when that set grows (:attr:`pending`). One query at a time: a search
    reuses a scratch array (the replica searches under its lock).
    """

    def __init__(self, nbits: int, m: int | None = None) -> None:
        if m is None:
            m = max(1, nbits // 16)
        self.nbits = nbits
        self.m = m
        # Substring j covers bits [bounds[j], bounds[j+1]) of the code (bit 0 = MSB of byte 0).
        base, extra = divmod(nbits, m)
        sizes = [base + (1 if j < extra else 0) for j in range(m)]
        if max(sizes) > 24:
            raise ValueError(f"substrings of {max(sizes)} bits are too long; use more tables")
        self.sizes = sizes
        self.bounds = np.cumsum([0, *sizes])
        self.n = 0
        self._stale = np.zeros(0, dtype=bool)
        self._stale_rows: set[int] = set()
        self._seen = np.zeros(0, dtype=bool)
        self._orders: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._masks: dict[tuple[int, int], np.ndarray] = {}

    def substrings(self, codes: np.ndarray) -> np.ndarray:
        """``(n, nbytes)`` packed codes to ``(m, n)`` int64 substring values."""
        codes = np.asarray(codes, np.uint8)
        out = np.empty((self.m, codes.shape[0]), dtype=np.int64)
        if all(b % 8 == 0 for b in self.bounds):
            # Byte-aligned substrings (64 bits in 4 x 16...): combine whole bytes, big-endian.
            for j in range(self.m):
                lo, hi = self.bounds[j] // 8, self.bounds[j + 1] // 8
                acc = np.zeros(codes.shape[0], np.int64)
                for byte in range(lo, hi):
                    acc <<= 8
                    acc |= codes[:, byte]
                out[j] = acc
            return out
        bits = np.unpackbits(codes, axis=1)[:, : self.nbits]
        for j in range(self.m):
            lo, hi = self.bounds[j], self.bounds[j + 1]
            weights = (1 << np.arange(hi - lo - 1, -1, -1, dtype=np.int64)).astype(np.int64)
            out[j] = bits[:, lo:hi].astype(np.int64) @ weights
        return out

    def build(self, codes: np.ndarray, chunk: int = 1 << 18) -> MultiIndexHash:
        """Index rows ``0..n-1`` of packed ``codes``; rebuilding replaces the tables."""
        codes = np.asarray(codes, np.uint8)
        n = codes.shape[0]
        subs = np.empty((self.m, n), dtype=np.int32)  # substrings are at most 24 bits
        for s in range(0, n, chunk):
            subs[:, s : s + chunk] = self.substrings(codes[s : s + chunk])
        self._orders, self._offsets = [], []
        for j in range(self.m):
            key = subs[j].astype(np.uint16) if self.sizes[j] <= 16 else subs[j]  # 16-bit: radix sort
            order = np.argsort(key, kind="stable").astype(np.uint32 if n < 2**32 else np.int64)
            counts = np.bincount(subs[j], minlength=1 << self.sizes[j])
            offsets = np.zeros(counts.size + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            self._orders.append(order)
            self._offsets.append(offsets)
        self.n = n
        self._stale = np.zeros(n, dtype=bool)
        self._stale_rows = set()
        return self

    def invalidate(self, rows: np.ndarray) -> None:
        """Rows whose code changed since :meth:`build`: their table entries are now wrong."""
        rows = np.asarray(rows, np.int64)
        rows = rows[rows < self.n]
        self._stale[rows] = True
        self._stale_rows.update(rows.tolist())

    @property
    def nbytes(self) -> int:
        """Memory held by the tables."""
        return sum(o.nbytes for o in self._orders) + sum(o.nbytes for o in self._offsets)

    def pending(self, n_total: int) -> int:
        """Rows scanned outside the tables at each query (added or changed since the build)."""
        return max(0, n_total - self.n) + len(self._stale_rows)

    def _shell(self, j: int, s: int) -> np.ndarray:
        key = (self.sizes[j], s)
        if key not in self._masks:
            self._masks[key] = _flip_masks(self.sizes[j], s)
        return self._masks[key]

    def _bucket_rows(self, j: int, value: int, s: int) -> np.ndarray:
        vals = value ^ self._shell(j, s)
        offsets = self._offsets[j]
        starts = offsets[vals]
        lens = offsets[vals + 1] - starts
        total = int(lens.sum())
        if total == 0:
            return np.empty(0, np.int64)
        nz = lens > 0
        starts, lens = starts[nz], lens[nz]
        # Concatenate ranges [start, start+len) without a Python loop.
        pos = np.repeat(starts - np.concatenate(([0], np.cumsum(lens)[:-1])), lens) + np.arange(total)
        return self._orders[j][pos].astype(np.int64)

    def knn(
        self,
        planes: np.ndarray,
        codes_query: bytes | np.ndarray,
        k: int,
        *,
        exclude: Exclusion | None = None,
        max_distance: int | None = None,
        max_candidates: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact k-NN over all columns of ``planes`` (``(W, n_total)``), ordered by (distance, row).

        Rows ``< n`` are found through the tables, later and invalidated rows by a scan. Rows whose
        ``exclude`` byte is non-zero are never returned. With
        ``max_candidates``, gives up (returns None) once the table lookups have produced that many
        rows: the neighbourhood is sparse (as with uniformly random codes) and a linear scan is
        cheaper from there.
        """
        n_total = planes.shape[1]
        extra_rows = np.concatenate(
            (np.fromiter(sorted(self._stale_rows), np.int64, len(self._stale_rows)), np.arange(self.n, n_total))
        )
        q = np.frombuffer(codes_query, np.uint8) if isinstance(codes_query, bytes) else np.asarray(codes_query)
        qw = query_words(q)
        qsub = self.substrings(q.reshape(1, -1))[:, 0]
        cap = self.nbits if max_distance is None else min(max_distance, self.nbits)
        if k <= 0 or cap < 0:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        # Candidates found so far (rows, distances); rows already seen are dropped by np.unique.
        found_rows = np.empty(0, np.int64)
        found_d = np.empty(0, np.int64)
        if len(extra_rows):
            er = np.asarray(extra_rows, np.int64)
            d = distances(np.ascontiguousarray(planes[:, er]), qw).astype(np.int64)
            if exclude is not None:
                d = d | excluded_at(exclude, er).astype(np.int64)
            keep = d <= cap
            found_rows, found_d = er[keep], d[keep]
        # Rows already looked at, so that a code found in two tables counts once. The array is
        # kept between queries and only the touched rows are cleared (a fresh one costs a pass).
        if self._seen.shape[0] != self.n:
            self._seen = np.zeros(self.n, dtype=bool)
        seen = self._seen
        touched: list[np.ndarray] = []
        has_stale = bool(self._stale_rows)
        looked = 0
        try:
            for s in range(max(self.sizes) + 1):
                for j in range(self.m):
                    if s > self.sizes[j]:
                        continue
                    rows = self._bucket_rows(j, int(qsub[j]), s)
                    looked += rows.size
                    if max_candidates is not None and looked > max_candidates:
                        return None
                    if rows.size:
                        rows = rows[~seen[rows]]
                    if rows.size:
                        seen[rows] = True
                        touched.append(rows)
                        if has_stale:
                            rows = rows[~self._stale[rows]]
                        if exclude is not None:
                            rows = rows[excluded_at(exclude, rows) == 0]
                        d = distances(np.ascontiguousarray(planes[:, rows]), qw).astype(np.int64)
                        keep = d <= cap
                        found_rows = np.concatenate((found_rows, rows[keep]))
                        found_d = np.concatenate((found_d, d[keep]))
                    # Every code within `guaranteed` has been seen (pigeonhole over the tables).
                    guaranteed = self.m * s + j
                    if guaranteed >= cap or (found_d.size >= k and np.partition(found_d, k - 1)[k - 1] <= guaranteed):
                        r, d = _order(found_rows, found_d)
                        return r[:k], d[:k]
        finally:
            for rows in touched:
                seen[rows] = False
        r, d = _order(found_rows, found_d)
        return r[:k], d[:k]


@dataclass
class Planner:
    """Per query, multi-index hashing or the scan, whichever is cheaper on this data.

    Dense neighbourhoods (real images cluster) are answered from a few buckets; when the table
    lookups pass ``budget_fraction`` of the rows (a table candidate costs about 50 scanned codes)
    the neighbourhood is sparse and the query finishes with the scan. After a run of such
    overruns (uniformly random codes) only every 16th query tries the tables, so the wasted work
    stays small while the data can still prove itself clustered again.
    """

    budget_fraction: float = 0.02
    # Larger k (a re-ranking shortlist of 300) goes to the scan: the tables' radius grows with k
    # until their lookups pass the budget, and the scan that follows then doubles the work. At 1M
    # clustered codes, k = 301: tables p50 / p99 1.15 / 4.11 ms, scan 0.94 / 1.24 ms; at 4M the
    # tables still have the worse tail (14.98 against 6.14 ms).
    max_k: int = 64
    misses: int = 0
    queries: int = 0

    def knn(
        self,
        planes: np.ndarray,
        mih: MultiIndexHash | None,
        query: bytes,
        k: int,
        *,
        nbits: int,
        exclude: Exclusion | None = None,
        max_distance: int | None = None,
        selector: Selector | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        self.queries += 1
        if mih is not None and k <= self.max_k and (self.misses < 3 or self.queries % 16 == 0):
            budget = max(2_000, int(self.budget_fraction * planes.shape[1]))
            found = mih.knn(planes, query, k, exclude=exclude, max_distance=max_distance, max_candidates=budget)
            self.misses = 0 if found is not None else self.misses + 1
            if found is not None:
                return found
        return knn(
            planes,
            query_words(query),
            k,
            nbits=nbits,
            exclude=exclude,
            max_distance=max_distance,
            selector=selector,
        )
