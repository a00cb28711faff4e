"""Retrieval metrics, one implementation for every method (codes and float embeddings alike).

Ranking: database items sorted by distance to the query, ties broken by database order (stable
sort) so that results are reproducible; with short codes many items tie, which this does not
flatter. ``relevant`` = same label. Definitions (the DeepHash conventions):

- AP@k = sum_{r<=k} P@r rel_r / sum_{r<=k} rel_r (0 when nothing relevant in the top k);
  mAP@all uses k = database size.
- precision@k = relevant in the top k / k.
- precision within Hamming radius 2 = relevant among items with distance <= 2 / their number,
  0 for a query that retrieves nothing (so empty answers are not free).
- PR curve: mean precision and mean recall at a grid of cut-offs of the ranking.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hashing import bits as bitcodes


def hamming_distances(query_codes: np.ndarray, db_codes: np.ndarray) -> np.ndarray:
    """Packed codes -> ``(nq, ndb)`` int distances (chunked so memory stays small)."""
    out = np.empty((len(query_codes), len(db_codes)), dtype=np.int32)
    for s in range(0, len(query_codes), 256):
        out[s : s + 256] = bitcodes.hamming(query_codes[s : s + 256], db_codes)
    return out


def cosine_distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    dn = db / np.maximum(np.linalg.norm(db, axis=1, keepdims=True), 1e-12)
    return (1.0 - qn @ dn.T).astype(np.float32)


def _ranked_relevance(dist: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray) -> np.ndarray:
    order = np.argsort(dist, axis=1, kind="stable")
    return db_labels[order] == q_labels[:, None]


def average_precision(rel: np.ndarray, k: int | None = None) -> np.ndarray:
    """Per-query AP over the top ``k`` of ranked relevance rows ``(nq, ndb)`` bool."""
    rel = rel[:, :k] if k else rel
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    prec = hits / ranks
    n_rel = hits[:, -1]
    ap = (prec * rel).sum(axis=1) / np.maximum(n_rel, 1)
    return np.where(n_rel > 0, ap, 0.0)


def ties_at(dist: np.ndarray, k: int) -> float:
    """Median, over queries, of how many database items lie at the query's k-th nearest distance.

    mAP rewards codes that separate the labels even when they collapse onto a few values per label;
    this says how many candidates the ranking cannot tell apart where a viewer's answer is cut (a
    figure near k means a real order, hundreds mean the top k are picked by tie-breaking alone).
    """
    k = min(k, dist.shape[1])
    kth = np.partition(dist, k - 1, axis=1)[:, k - 1]
    return float(np.median((dist == kth[:, None]).sum(axis=1)))


def retrieval_metrics(
    dist: np.ndarray,
    q_labels: np.ndarray,
    db_labels: np.ndarray,
    *,
    hamming: bool,
    ks: tuple[int, ...] = (100,),
    precision_at: tuple[int, ...] = (10,),
    pr_points: int = 50,
) -> dict[str, Any]:
    """All figures for one method from its query-database distance matrix."""
    q_labels, db_labels = np.asarray(q_labels), np.asarray(db_labels)
    rel = _ranked_relevance(dist, q_labels, db_labels)
    out: dict[str, Any] = {"map_all": float(average_precision(rel).mean())}
    for k in ks:
        out[f"map@{k}"] = float(average_precision(rel, k).mean())
    for k in precision_at:
        out[f"precision@{k}"] = float(rel[:, :k].mean())
    if hamming:
        within = dist <= 2
        relevant = db_labels[None, :] == q_labels[:, None]
        n_ret = within.sum(axis=1)
        n_hit = (within & relevant).sum(axis=1)
        out["precision_hamming2"] = float(np.where(n_ret > 0, n_hit / np.maximum(n_ret, 1), 0.0).mean())
        out["queries_with_hamming2_hits"] = float((n_ret > 0).mean())
        out["ties_at_10"] = ties_at(dist, 10)
    total_rel = np.maximum(rel.sum(axis=1), 1)
    cut = np.unique(np.geomspace(1, rel.shape[1], pr_points).astype(int))
    hits = np.cumsum(rel, axis=1)[:, cut - 1]
    out["pr_curve"] = {
        "cutoffs": cut.tolist(),
        "precision": (hits / cut).mean(axis=0).round(5).tolist(),
        "recall": (hits / total_rel[:, None]).mean(axis=0).round(5).tolist(),
    }
    return out
