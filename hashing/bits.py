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


# Candidates are scored this many at a time: a float32 copy of 1,000 of them (512 KB) is a fresh
# memory mapping for every query, and its page faults cost more than the product (27 variants x 1,000
# candidates: 1.0-1.2 ms whole, 0.46 ms in blocks of 256, on the 2-core development machine).
_BLOCK = 256


def rerank_similarity(query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Cosine between an int8 re-ranking vector and the rows of ``vectors`` (0 for a zero vector).

    A query of several vectors ``(V, d)`` (the reference's variants, :mod:`hashing.variants`) scores
    each row by its best cosine to any of them.
    """
    q = np.asarray(query, np.float32)
    q = q.reshape(-1, q.shape[-1]) if q.ndim > 1 else q[None, :]
    q_unit = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    vectors = np.asarray(vectors)
    out = np.zeros(len(vectors), np.float32)
    if not len(q):
        return out
    for start in range(0, len(vectors), _BLOCK):
        v = vectors[start : start + _BLOCK].astype(np.float32)
        norm = np.sqrt(np.einsum("ij,ij->i", v, v))
        best = (q_unit @ v.T).max(axis=0)
        out[start : start + _BLOCK] = np.where(norm > 0, best / np.maximum(norm, 1e-12), 0.0)
    return out


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
