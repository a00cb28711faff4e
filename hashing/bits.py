"""The one binary code format used everywhere: packed ``uint8`` of shape ``(n, nbits // 8)``.

Bit ``j`` of a code is bit ``7 - j % 8`` of byte ``j // 8`` (``numpy.packbits`` big-endian order), so
a code's bytes are what Redis stores in a slot and what FAISS binary indexes take.
"""

from __future__ import annotations

import numpy as np

VALID_NBITS = (16, 32, 48, 64, 128)


def binarize(relaxed: np.ndarray) -> np.ndarray:
    """Hash-layer outputs to {0,1} bits with ``x >= 0``.

    Not ``sign``: sign maps 0 to 0 and would make ternary codes.
    """
    return (np.asarray(relaxed) >= 0).astype(np.uint8)


def pack(bits: np.ndarray) -> np.ndarray:
    """``(n, nbits)`` of {0,1} (or booleans) to packed ``(n, nbits // 8)`` uint8."""
    bits = np.asarray(bits)
    if bits.ndim == 1:
        bits = bits[None, :]
    if bits.shape[1] % 8:
        raise ValueError(f"code length {bits.shape[1]} is not a multiple of 8")
    return np.packbits(bits.astype(bool), axis=1)


def unpack(codes: np.ndarray, nbits: int | None = None) -> np.ndarray:
    """Packed ``(n, nbytes)`` uint8 back to ``(n, nbits)`` {0,1} uint8."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.ndim == 1:
        codes = codes[None, :]
    bits = np.unpackbits(codes, axis=1)
    return bits if nbits is None else bits[:, :nbits]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed codes ``a (n, B)`` and ``b (m, B)`` -> ``(n, m)``.

    Popcount of XOR on bytes; for large databases use :mod:`hashing.search`, which works on
    64-bit words.
    """
    a = np.asarray(a, dtype=np.uint8)
    b = np.asarray(b, dtype=np.uint8)
    if a.ndim == 1:
        a = a[None, :]
    if b.ndim == 1:
        b = b[None, :]
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.bitwise_count(x).sum(axis=2, dtype=np.int32)


# Re-ranking vectors: the model's float re-ranking key (hashing.drh.rerank_key) stored as int8, one
# byte per value. The Hamming shortlist is re-sorted by their cosine, which a per-vector scale leaves
# unchanged: each vector is scaled so its largest value is +/-127.


def quantize_rerank(vectors: np.ndarray) -> np.ndarray:
    """Float re-ranking keys ``(n, d)`` to int8 re-ranking vectors (each scaled to use +/-127)."""
    v = np.asarray(vectors, np.float32)
    peak = np.abs(v).max(axis=-1, keepdims=True) if v.size else np.ones(v.shape[:-1] + (1,), np.float32)
    scaled = v * (127.0 / np.maximum(peak, 1e-12))
    return np.clip(np.rint(scaled), -127, 127).astype(np.int8)


class Reranker:
    """Scores a Hamming shortlist by its re-ranking vectors: each candidate's cosine to the query's
    vector, or its best cosine to any of the query's variants (``(V, d)``, :mod:`hashing.variants`).

    It keeps its float and product buffers between queries. A fresh float32 copy of 1,000
    candidates (512 KB) is a new memory mapping at every query, and its page faults cost more than the
    product; scoring in blocks of 256 avoided them but paid numpy's per-call overhead four times. With
    kept buffers one gather, one conversion and one matrix product score the whole shortlist. 27
    variants x 1,000 candidates of 128 values, gather included, p50 over 250 shortlists, four runs
    interleaved (on the 2-core development machine, one BLAS thread): 0.37-0.62 ms in blocks of 256,
    0.27-0.49 ms so; the matrix product is about 0.19 of it.

    Not thread-safe: one per searching thread (the replica scores under its lock).
    """

    # Rows scored per pass: a whole served shortlist (1,000, or 4 k for a large k) in one; larger
    # inputs (a test over a whole table) in passes, so the buffers stay a few megabytes.
    BLOCK = 4096

    def __init__(self) -> None:
        self._float = np.empty((0, 0), np.float32)
        self._product = np.empty(0, np.float32)

    def _buffers(self, rows: int, d: int, v: int) -> tuple[np.ndarray, np.ndarray]:
        if self._float.shape[0] < rows or self._float.shape[1] != d:
            self._float = np.empty((self.BLOCK, d), np.float32)
        if self._product.shape[0] < v * rows:
            self._product = np.empty(v * self.BLOCK, np.float32)
        return self._float[:rows], self._product[: v * rows].reshape(v, rows)

    def similarity(self, query: np.ndarray, table: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Cosine of ``query`` (one vector ``(d,)`` or variants ``(V, d)``) to ``table[rows]`` (every
        row of ``table`` without ``rows``); 0 for a zero vector."""
        q = np.asarray(query, np.float32)
        q = q.reshape(-1, q.shape[-1]) if q.ndim > 1 else q[None, :]
        q_unit = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        m = len(table) if rows is None else len(rows)
        out = np.zeros(m, np.float32)
        if not len(q) or not m:
            return out
        for start in range(0, m, self.BLOCK):
            stop = min(start + self.BLOCK, m)
            as_float, product = self._buffers(stop - start, q.shape[1], len(q))
            # take, not take(out=...): numpy's take into a given array is the slower one (0.085 ms
            # against 0.028 for 1,000 rows of 128), and 128 KB is no fresh mapping.
            chosen = table[start:stop] if rows is None else table.take(rows[start:stop], axis=0)
            np.copyto(as_float, chosen, casting="unsafe")
            norm = np.sqrt(np.einsum("ij,ij->i", as_float, as_float))
            np.matmul(q_unit, as_float.T, out=product)
            best = product.max(axis=0)
            out[start:stop] = np.where(norm > 0, best / np.maximum(norm, 1e-12), 0.0)
        return out


def rerank_similarity(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine between an int8 re-ranking vector and the rows of ``vectors`` (0 for a zero vector).

    A query of several vectors ``(V, d)`` (the reference's variants, :mod:`hashing.variants`) scores
    each row by its best cosine to any of them. One-off: a search scores its shortlists with a kept
    :class:`Reranker`, which this calls.
    """
    return Reranker().similarity(query, np.asarray(vectors))


def pooled_variants(variants: np.ndarray) -> np.ndarray:
    """The variants of a study or series from its images' stored int8 variants ``(m, V, d)``: per
    variant, the mean of the images' unit keys, stored as int8 (:func:`quantize_rerank`).

    A study's own re-ranking key pools its images' layouts; pooling each variant alike gives it the
    same tolerance. A one-image study gets exactly its image's variants.
    """
    v = np.asarray(variants, np.float32)
    if v.ndim != 3 or not len(v):
        raise ValueError(f"expected (m >= 1, V, d) variants, got shape {v.shape}")
    if len(v) == 1:
        return np.asarray(variants, np.int8)[0]
    unit = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
    return quantize_rerank(unit.mean(axis=0))
