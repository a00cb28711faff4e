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


# -- the evaluation protocol: rankings with random ties, per-query scores, intervals ---------------------


def ranking(dist: np.ndarray, rng: np.random.Generator, exclude: np.ndarray | None = None) -> np.ndarray:
    """Database indices of each query, nearest first, ties in random (seeded) order.

    ``exclude[i]`` (a database index, -1 for none) is put last for query ``i``: the query itself when
    the database contains it. Random ties matter for short codes: in database order they would rank
    the items indexed first, which flatters codes that collapse onto a few values.
    """
    key = dist.astype(np.float64, copy=True)
    if np.issubdtype(dist.dtype, np.integer):
        key += rng.random(dist.shape) * 0.5  # below the gap between two distances
    else:
        key += rng.random(dist.shape) * 1e-9  # float ties are rare; break them at random too
    if exclude is not None:
        rows = np.flatnonzero(exclude >= 0)
        key[rows, exclude[rows]] = np.inf
    return np.argsort(key, axis=1, kind="stable")


def rerank(order: np.ndarray, similarity: np.ndarray, shortlist: int) -> np.ndarray:
    """The served ranking: the first ``shortlist`` of ``order`` re-sorted by ``similarity`` (higher is
    nearer), the rest kept in order. What the query process does with the stored relaxed codes."""
    out = order.copy()
    s = min(shortlist, order.shape[1])
    top = order[:, :s]
    sims = np.take_along_axis(similarity, top, axis=1)
    out[:, :s] = np.take_along_axis(top, np.argsort(-sims, axis=1, kind="stable"), axis=1)
    return out


def label_scores(
    order: np.ndarray, q_labels: np.ndarray, db_labels: np.ndarray, k: int = 100, exclude: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per labelled query: AP over the whole ranking, AP@k and precision@10 (relevant = same label;
    an unlabelled item (-1) is never relevant). ``exclude`` as for :func:`ranking`: the query itself,
    ranked last, does not count."""
    keep = np.asarray(q_labels) >= 0
    ranked = db_labels[order[keep]]
    rel = (ranked == np.asarray(q_labels)[keep][:, None]) & (ranked >= 0)
    if exclude is not None:
        rel[np.asarray(exclude)[keep] >= 0, -1] = False
    return {"map_all": average_precision(rel), f"map@{k}": average_precision(rel, k), "p@10": rel[:, :10].mean(axis=1)}


def same_patient_scores(
    order: np.ndarray,
    q_patients: np.ndarray,
    db_patients: np.ndarray,
    exclude: np.ndarray,
    ks: tuple[int, ...] = (1, 10),
) -> dict[str, np.ndarray]:
    """For each query with at least one *other* image of its patient in the database: is one in the top
    k? (the query itself, ``exclude``, is never counted). Needs no label: it measures whether the
    answers look alike on any archive, the measure models are selected by."""
    same = db_patients[None, :] == np.asarray(q_patients)[:, None]
    rows = np.flatnonzero(exclude >= 0)
    same[rows, exclude[rows]] = False
    eligible = same.any(axis=1)
    hits = np.take_along_axis(same, order, axis=1)[eligible]
    return {f"r@{k}": hits[:, :k].any(axis=1).astype(np.float64) for k in ks}


def bootstrap(values: np.ndarray, rng: np.random.Generator, n: int = 1000) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval over queries (resampled with replacement)."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = rng.integers(0, values.size, size=(n, values.size))
    means = values[idx].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n: int = 1000
) -> tuple[float, float, float]:
    """Mean of ``a - b`` and its 95% percentile-bootstrap interval, the same queries resampled for
    both: two methods scored on the same queries are compared by their difference per query, not by
    whether their own intervals overlap (much of the spread is the queries', shared by both)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired figures need the same queries: {a.shape} against {b.shape}")
    return bootstrap(a - b, rng, n)


def distinct_codes(codes: np.ndarray) -> int:
    """How many different codes a set of packed codes holds (collapse shows as far fewer than items)."""
    return int(np.unique(np.ascontiguousarray(codes), axis=0).shape[0])
