"""Hamming search against brute force on the same data (exact scan, radius, multi-index hashing)."""

import numpy as np
import pytest

from hashing import bits
from hashing.search import (
    InRange,
    MultiIndexHash,
    Planner,
    Selector,
    brute_force,
    knn,
    knn_rows,
    query_words,
    radius,
    to_words,
)


def clustered(rng: np.random.Generator, n: int, nbits: int, centres: int = 20, flip: float = 0.06) -> np.ndarray:
    """Codes near a few centres, with exact duplicates, so that ties are frequent."""
    c = rng.integers(0, 2, size=(centres, nbits), dtype=np.uint8)
    b = c[rng.integers(0, centres, size=n)]
    noise = (rng.random((n, nbits)) < flip).astype(np.uint8)
    return bits.pack(b ^ noise)


@pytest.mark.parametrize("nbits", [16, 32, 48, 64, 128])
def test_words_distances_match_bytes(nbits):
    rng = np.random.default_rng(nbits)
    codes = rng.integers(0, 256, size=(300, nbits // 8), dtype=np.uint8)
    planes = to_words(codes)
    assert planes.shape == ((nbits + 63) // 64, 300)
    q = codes[7]
    from hashing.search import distances

    expected = bits.hamming(q, codes)[0]
    assert np.array_equal(distances(planes, query_words(q)).astype(np.int32), expected)


@pytest.mark.parametrize("nbits", [32, 48, 64, 128])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_knn_equals_brute_force_with_ties(nbits, kind):
    rng = np.random.default_rng(1000 + nbits)
    n = 5000
    if kind == "random":
        codes = rng.integers(0, 256, size=(n, nbits // 8), dtype=np.uint8)
    else:
        codes = clustered(rng, n, nbits)
    planes = to_words(codes)
    sel = Selector()
    for qi in range(25):
        q = codes[rng.integers(0, n)] if qi % 2 else rng.integers(0, 256, nbits // 8, dtype=np.uint8)
        for k in (1, 10, 137):
            rows, d = knn(planes, query_words(q), k, nbits=nbits, selector=sel)
            er, ed = brute_force(codes, q, k)
            assert np.array_equal(rows, er) and np.array_equal(d, ed)


def test_knn_over_many_codes_equals_brute_force_whatever_k_the_queries_ask_in_turn():
    """At this size the threshold is guessed from a sample of the distances; queries alternate
    between an answer's k and a re-ranking shortlist's, near and far codes, so guesses miss both ways
    and the exact fallback must take over."""
    rng = np.random.default_rng(7)
    n = 200_000
    codes = clustered(rng, n, 64)
    planes = to_words(codes)
    sel = Selector()
    for qi in range(12):
        q = codes[rng.integers(0, n)] if qi % 3 else rng.integers(0, 256, 8, dtype=np.uint8)
        for k in (11, 301, 1):
            rows, d = knn(planes, query_words(q), k, nbits=64, selector=sel)
            er, ed = brute_force(codes, q, k)
            assert np.array_equal(rows, er) and np.array_equal(d, ed)


def test_a_sample_that_misleads_the_threshold_still_gives_the_exact_answer():
    """The sampled rows (every 12th, at this size) are nearer than the rest: the guess is too tight
    for a large k. Identical codes: every guess collects them all, more than the buffer holds."""
    n, step = 200_000, 200_000 // Selector.SAMPLE
    base = np.zeros(64, np.uint8)
    near, far = base.copy(), base.copy()
    near[0] = 1
    far[:10] = 1
    codes = bits.pack(np.where((np.arange(n) % step == 0)[:, None], near, far))
    q = bits.pack(base[None])[0]
    for k, planes in ((20_000, to_words(codes)), (50, to_words(np.repeat(codes[1:2], n, axis=0)))):
        rows, d = knn(planes, query_words(q), k, nbits=64, selector=Selector())
        er, ed = brute_force(codes if k == 20_000 else np.repeat(codes[1:2], n, axis=0), q, k)
        assert np.array_equal(rows, er) and np.array_equal(d, ed)


def test_knn_respects_exclusion_and_max_distance():
    rng = np.random.default_rng(5)
    codes = clustered(rng, 4000, 64)
    planes = to_words(codes)
    exclude = np.where(rng.random(4000) < 0.7, 255, 0).astype(np.uint8)
    eligible = np.flatnonzero(exclude == 0)
    q = codes[11]
    rows, d = knn(planes, query_words(q), 50, nbits=64, exclude=exclude, max_distance=6)
    er, ed = brute_force(codes[eligible], q, 50)
    keep = ed <= 6
    assert np.array_equal(rows, eligible[er[keep]]) and np.array_equal(d, ed[keep])
    assert len(rows) > 0
    # Same through the subset path used for selective filters.
    rows2, d2 = knn_rows(planes, eligible, query_words(q), 50, max_distance=6)
    assert np.array_equal(rows2, rows) and np.array_equal(d2, d)


@pytest.mark.parametrize("form", ["mask", "range"])
@pytest.mark.parametrize("nbits", [64, 128])
def test_a_row_mask_that_leaves_few_rows_holds_in_scan_radius_and_tables(nbits, form):
    """A broad filter's row mask (most rows excluded, as a filter on their study leaves them) against
    the brute force over the rows that pass: the scan of one plane and of two, a radius search, and
    multi-index hashing. As a mask, and as a mask with a range on a per-row key that the scan tests
    itself (a date range new to the query: ``InRange``), which must exclude exactly the same rows."""
    rng = np.random.default_rng(nbits)
    n = 5000
    codes = clustered(rng, n, nbits)
    planes = to_words(codes)
    mask = np.where(rng.random(n) < 0.3, 255, 0).astype(np.uint8)
    dates = rng.integers(20000101, 20250101, n).astype(np.int32)
    dates[rng.random(n) < 0.05] = 0  # unknown: outside every range
    lo, hi = 20080101, 20171231
    outside = (dates < lo) | (dates > hi)
    exclude = InRange(mask, dates, lo, hi) if form == "range" else np.where(outside, 255, mask).astype(np.uint8)
    eligible = np.flatnonzero((mask == 0) & ~outside)
    assert 0 < eligible.size < n // 2
    mih = MultiIndexHash(nbits).build(codes)
    for qi in range(10):
        q = codes[rng.integers(0, n)]
        er, ed = brute_force(codes[eligible], q, 40)
        want_rows, want_d = eligible[er], ed
        for k in (1, 40):
            rows, d = knn(planes, query_words(q), k, nbits=nbits, exclude=exclude)
            assert np.array_equal(rows, want_rows[:k]) and np.array_equal(d, want_d[:k]), (qi, k)
            found = mih.knn(planes, q, k, exclude=exclude)
            assert found is not None and np.array_equal(found[0], rows) and np.array_equal(found[1], d)
        rows, d = radius(planes, query_words(q), 6, exclude=exclude)
        full = bits.hamming(q, codes[eligible])[0]
        inside = np.flatnonzero(full <= 6)
        inside = inside[np.lexsort((inside, full[inside]))]
        assert np.array_equal(rows, eligible[inside]) and np.array_equal(d, full[inside])


def test_knn_with_fewer_eligible_than_k():
    codes = np.random.default_rng(2).integers(0, 256, size=(100, 8), dtype=np.uint8)
    exclude = np.full(100, 255, np.uint8)
    exclude[[3, 50, 99]] = 0
    rows, d = knn(to_words(codes), query_words(codes[0]), 10, nbits=64, exclude=exclude)
    assert sorted(rows.tolist()) == [3, 50, 99] and len(d) == 3


def test_radius_equals_brute_force():
    rng = np.random.default_rng(9)
    codes = clustered(rng, 3000, 64)
    q = codes[0]
    rows, d = radius(to_words(codes), query_words(q), 5)
    full = bits.hamming(q, codes)[0]
    expected = np.flatnonzero(full <= 5)
    expected = expected[np.lexsort((expected, full[expected]))]
    assert np.array_equal(rows, expected) and np.array_equal(d, full[expected])
    assert len(rows) > 10


@pytest.mark.parametrize("nbits,m", [(64, None), (64, 3), (48, None), (128, None), (32, 2)])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_multi_index_hashing_equals_exact_scan(nbits, m, kind):
    rng = np.random.default_rng(nbits * 7 + (m or 0))
    n = 6000
    if kind == "random":
        codes = rng.integers(0, 256, size=(n, nbits // 8), dtype=np.uint8)
    else:
        codes = clustered(rng, n, nbits)
    planes = to_words(codes)
    mih = MultiIndexHash(nbits, m).build(codes[:5000])
    # Rows added after the build, and rows whose code changed, are scanned outside the tables.
    changed = rng.choice(5000, size=40, replace=False)
    codes[changed] = codes[rng.integers(0, n, size=40)]
    planes = to_words(codes)
    mih.invalidate(changed)
    assert mih.pending(n) == 1040
    exclude = np.where(rng.random(n) < 0.2, 255, 0).astype(np.uint8)
    for qi in range(20):
        q = codes[rng.integers(0, n)] if qi % 2 else rng.integers(0, 256, nbits // 8, dtype=np.uint8)
        for k, r in ((10, None), (1, None), (100, 8)):
            rows, d = mih.knn(planes, q, k, exclude=exclude, max_distance=r)
            er, ed = knn(planes, query_words(q), k, nbits=nbits, exclude=exclude, max_distance=r)
            assert np.array_equal(rows, er) and np.array_equal(d, ed)


def test_multi_index_hashing_gives_up_past_its_budget():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(20000, 8), dtype=np.uint8)
    mih = MultiIndexHash(64).build(codes)
    planes = to_words(codes)
    q = rng.integers(0, 256, 8, dtype=np.uint8)
    assert mih.knn(planes, q, 10, max_candidates=100) is None  # random codes: a sparse neighbourhood
    rows, d = mih.knn(planes, q, 10, max_candidates=10**9)
    er, ed = brute_force(codes, q, 10)
    assert np.array_equal(rows, er) and np.array_equal(d, ed)


def test_kernels_histogram_and_row_collection_match_numpy():
    from hashing import kernels

    rng = np.random.default_rng(21)
    dist = rng.integers(0, 65, size=10_003).astype(np.uint8)  # not a multiple of 4 nor of 64
    dist[rng.random(dist.size) < 0.1] = 255
    hist = np.zeros(256, np.int64)
    kernels.histogram(dist, hist)
    assert np.array_equal(hist, np.bincount(dist, minlength=256))
    dist[-5:] = [0, 1, 2, 3, 200]  # the tail after the last whole word of eight
    # 128 and above: a 128-bit code's radius, past the word-at-a-time test; a strided view too
    for t, d in [(t, dist) for t in (0, 3, 40, 64, 127, 128, 200, 254)] + [(5, dist[::3])]:
        expected = np.flatnonzero(d <= t)
        out = np.empty(expected.size, np.int64)
        assert kernels.rows_at_most(d, np.uint8(t), out) == expected.size
        assert np.array_equal(out, expected)
        if expected.size:
            assert kernels.rows_at_most(d, np.uint8(t), np.empty(expected.size - 1, np.int64)) == -1


def test_the_planner_answers_shortlists_by_the_scan_and_small_k_from_the_tables():
    """Exact either way; a re-ranking shortlist (k above ``max_k``) never consults the tables, whose
    tail is the worse one at that k (the numbers are in hashing.search.Planner)."""

    class Counting(MultiIndexHash):
        calls = 0

        def knn(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            Counting.calls += 1
            return super().knn(*args, **kwargs)

    rng = np.random.default_rng(9)
    codes = clustered(rng, 5000, 64)
    planes = to_words(codes)
    mih = Counting(64).build(codes)
    planner = Planner()
    for k in (11, 301):
        before = Counting.calls
        q = codes[rng.integers(0, 5000)]
        rows, d = planner.knn(planes, mih, bytes(q), k, nbits=64, selector=Selector())
        er, ed = brute_force(codes, q, k)
        assert np.array_equal(rows, er) and np.array_equal(d, ed)
        assert Counting.calls - before == (1 if k <= planner.max_k else 0)
