"""Compiled inner loops of the Hamming scan (numba), each a single streaming pass.

Why compiled: ``np.bitwise_count`` in numpy's portable build counts bits in software (about 0.9 ns
per 64-bit word here), and every numpy step of a scan is a separate pass over memory. These loops
are compiled for the host CPU, where LLVM turns the bit-count below into the hardware ``popcnt``
and vectorises the loop: the distance pass over a million 64-bit codes drops from about 1.1 ms to
0.35 ms. Each function is small enough to check against the numpy references in the tests
(``hashing.search.brute_force``, ``hashing.bits.hamming``).

Compilation happens once per process on first use (about 2 s for all of them here); with a writable
cache (``__pycache__`` next to this file, or ``NUMBA_CACHE_DIR``) later processes load the machine
code instead (about 1 s, most of it numba's own start). :func:`warm_up` lets a server pay that cost
at start, not on its first query (:func:`plugin.search.eligible.warm_up` does the same for the
filter pass, which uses :func:`jit` too).
"""

from __future__ import annotations

import numpy as np
from numba import njit


def jit(fn):  # noqa: ANN001, ANN202 (a decorator)
    """``njit`` with an on-disk cache where one is writable, without it where none is (also used by
    :mod:`plugin.search.eligible` for its filter pass)."""
    try:
        return njit(nogil=True, boundscheck=False, cache=True)(fn)
    except RuntimeError:  # "no locator available": a read-only install and no NUMBA_CACHE_DIR
        return njit(nogil=True, boundscheck=False)(fn)


_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(inline="always")
def _popcount(x: np.uint64) -> np.uint8:
    # The SWAR count of Hacker's Delight 5-2; LLVM recognises it and emits popcnt where it exists.
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.uint8((x * _H01) >> np.uint64(56))


@jit
def hamming_first(words: np.ndarray, q: np.uint64, out: np.ndarray) -> None:
    """``out[i] = popcount(words[i] ^ q)``: the first 64-bit plane of a code."""
    for i in range(words.shape[0]):
        out[i] = _popcount(words[i] ^ q)


@jit
def hamming_add(words: np.ndarray, q: np.uint64, out: np.ndarray) -> None:
    """``out[i] += popcount(words[i] ^ q)``: each further plane (codes longer than 64 bits)."""
    for i in range(words.shape[0]):
        out[i] += _popcount(words[i] ^ q)


@jit
def hamming_in_range(
    words: np.ndarray, q: np.uint64, add: bool, mask: np.ndarray, key: np.ndarray, lo: int, hi: int, out: np.ndarray
) -> None:
    """The last plane of a filtered scan: its distance (added to ``out`` when ``add``, else written),
    then 255 wherever ``mask[i]`` is non-zero or ``key[i]`` lies outside ``[lo, hi]``.

    The eligibility test rides the distance pass instead of a pass of its own: a row mask built for
    one query (a date range new to it) would be written, then read back by the scan.
    """
    if add:
        for i in range(words.shape[0]):
            inside = np.uint8(key[i] >= lo) & np.uint8(key[i] <= hi)
            out[i] = (out[i] + _popcount(words[i] ^ q)) | mask[i] | np.uint8(inside - np.uint8(1))
    else:
        for i in range(words.shape[0]):
            inside = np.uint8(key[i] >= lo) & np.uint8(key[i] <= hi)
            out[i] = _popcount(words[i] ^ q) | mask[i] | np.uint8(inside - np.uint8(1))


@jit
def histogram(dist: np.ndarray, hist: np.ndarray) -> None:
    """``hist[v]`` = how many ``dist[i] == v`` (``hist`` has 256 entries).

    Four interleaved tables, so that consecutive equal values do not wait on each other's store.
    """
    h = np.zeros((4, 256), np.int64)
    n = dist.shape[0]
    n4 = n - n % 4
    for i in range(0, n4, 4):
        h[0, dist[i]] += 1
        h[1, dist[i + 1]] += 1
        h[2, dist[i + 2]] += 1
        h[3, dist[i + 3]] += 1
    for i in range(n4, n):
        h[0, dist[i]] += 1
    for v in range(256):
        hist[v] = h[0, v] + h[1, v] + h[2, v] + h[3, v]


_ONES = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)


@jit
def rows_at_most(dist: np.ndarray, t: np.uint8, out: np.ndarray) -> int:
    """Writes the rows with ``dist[i] <= t``, ascending, into ``out``; returns how many, or -1 if
    they do not fit.

    Eight distances are tested at once, as one 64-bit word: ``(x - 0x01..01 * (t + 1)) & ~x &
    0x80..80`` is non-zero exactly when some byte of ``x`` is below ``t + 1`` (for ``t < 128``;
    Bit Twiddling Hacks, "determine if a word has a byte less than n"). Only the words where one is
    (a few in a hundred, in a k-NN scan) are walked byte by byte. A minimum over blocks of 64 bytes,
    the loop this replaced, took p50 0.44 ms at a million distances, this 0.27 (interleaved, 250
    shortlists of 1,000 on the 2-core development machine).
    """
    n = dist.shape[0]
    cap = out.shape[0]
    c = 0
    start = 0
    if t < 128 and dist.flags.c_contiguous:
        words = dist[: n - n % 8].view(np.uint64)
        below = _ONES * np.uint64(t + 1)
        for w in range(words.shape[0]):
            x = words[w]
            if (x - below) & ~x & _HIGH:
                for i in range(8 * w, 8 * w + 8):
                    if dist[i] <= t:
                        if c == cap:
                            return -1
                        out[c] = i
                        c += 1
        start = n - n % 8
    for i in range(start, n):
        if dist[i] <= t:
            if c == cap:
                return -1
            out[c] = i
            c += 1
    return c


def warm_up() -> None:
    """Compile (or load from the cache) every kernel now, on a few bytes."""
    words = np.zeros(4, np.uint64)
    dist = np.zeros(4, np.uint8)
    hamming_first(words, np.uint64(1), dist)
    hamming_add(words, np.uint64(1), dist)
    for add in (False, True):
        hamming_in_range(words, np.uint64(1), add, dist, np.zeros(4, np.int32), 1, 2, dist)
    histogram(dist, np.zeros(256, np.int64))
    histogram(dist[::2], np.zeros(256, np.int64))  # the strided sample of hashing.search.Selector
    rows_at_most(dist, np.uint8(1), np.zeros(4, np.int64))
