"""Unsupervised hashing baselines on a network's float features: LSH and ITQ.

Both take the same features DRH's hash layer sees (the embedding before it), so the comparison
isolates what learning the hash layer end to end adds. They are fitted on the database (training)
features, never on queries. Codes come out in the project's one format (packed uint8, ``x >= 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hashing import bits as bitcodes


@dataclass
class LinearHash:
    """``code = pack((x - mean) @ W >= 0)``: what both LSH and ITQ reduce to at query time."""

    mean: np.ndarray
    projection: np.ndarray

    def encode(self, x: np.ndarray) -> np.ndarray:
        return bitcodes.pack(bitcodes.binarize((np.asarray(x, np.float64) - self.mean) @ self.projection))


def fit_lsh(features: np.ndarray, nbits: int, seed: int = 0) -> LinearHash:
    """Sign of random Gaussian projections (Charikar 2002) of the centred features."""
    x = np.asarray(features, np.float64)
    rng = np.random.default_rng(seed)
    return LinearHash(x.mean(axis=0), rng.standard_normal((x.shape[1], nbits)))


def fit_itq(features: np.ndarray, nbits: int, iterations: int = 50, seed: int = 0) -> LinearHash:
    """Iterative quantization (Gong & Lazebnik, CVPR 2011): PCA to ``nbits`` dimensions, then the
    orthogonal rotation ``R`` minimising ``||B - V R||_F`` by alternating ``B = sgn(V R)`` and the
    Procrustes solution ``R = U W^T`` of ``svd(V^T B) = U S W^T``."""
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    xc = x - mean
    if nbits > xc.shape[1]:
        raise ValueError(f"ITQ needs nbits <= feature dimension ({xc.shape[1]}), got {nbits}")
    # Eigenvectors of the D x D scatter matrix: works for any number of samples (even fewer than bits).
    evals, evecs = np.linalg.eigh(xc.T @ xc)
    pca = evecs[:, np.argsort(evals)[::-1][:nbits]]
    v = xc @ pca
    rng = np.random.default_rng(seed)
    r, _ = np.linalg.qr(rng.standard_normal((nbits, nbits)))
    for _ in range(iterations):
        b = np.where(v @ r >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(v.T @ b)
        r = u @ wt
    return LinearHash(mean, pca @ r)


def itq_objective(features: np.ndarray, h: LinearHash) -> float:
    """``||B - V R||_F^2 / n`` for fitted ITQ (used by tests: rotation must beat plain PCA signs)."""
    v = (np.asarray(features, np.float64) - h.mean) @ h.projection
    return float(((np.where(v >= 0, 1.0, -1.0) - v) ** 2).sum() / len(v))
