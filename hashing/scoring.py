"""Scoring a retrieval method under the evaluation protocol, one implementation for every method.

A method is a :class:`Rep`: a representation of every image of a set (packed codes, float vectors,
or codes served with a re-ranking vector, or nothing at all for the chance row). A :class:`Protocol`
says which images are queries and which are the database, for two measures:

- **label measures** (where labels exist): mAP@all, mAP@100, P@10, relevant = same label;
- **same-patient recall** @1 and @10: for every query that has another image of its patient in the
  database, is one of them in the top 1 / top 10 (the query itself left out). No label needed. A
  served method also gets recall@10 from tighter shortlists (:data:`SHORTLISTS`). A served method with
``variants`` re-ranks as the service does for a stored reference: each candidate by its best cosine to
the query's variants (:mod:`hashing.variants`), from the larger tolerant shortlist.

Rankings break ties at random (seeded); every figure comes with a bootstrap 95% interval over
queries. Code methods also report ``ties@10`` (how many database items share the 10th-nearest
distance) and the number of distinct codes: a model whose codes collapse onto a few values can
score well on labels and still find nothing that looks alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hashing.metrics import (
    bootstrap,
    cosine_distances,
    distinct_codes,
    hamming_distances,
    label_scores,
    ranking,
    rerank,
    same_patient_scores,
    ties_at,
)
from hashing.search import SHORTLIST, TOLERANT_SHORTLIST


@dataclass
class Rep:
    """One method's view of every image (rows index-aligned with the image set)."""

    name: str
    kind: str  # "hamming", "served" (codes re-ranked by vectors), "cosine", "chance"
    codes: np.ndarray | None = None  # packed uint8 (n, nbits // 8)
    vectors: np.ndarray | None = None  # float (n, d)
    nbits: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    variants: np.ndarray | None = None  # float (n, V, d): a served method's query variants

    @property
    def shortlists(self) -> tuple[int, ...]:
        """A served method's shortlist, then the tighter ones it is also scored from."""
        if self.kind != "served":
            return ()
        main = TOLERANT_SHORTLIST if self.variants is not None else SHORTLIST
        return (main, *(s for s in SHORTLISTS if s < main))


@dataclass
class Protocol:
    """Queries and databases (image indices) of the two measures, and what relevance needs."""

    labels: np.ndarray  # int, -1 = no label
    patients: np.ndarray  # str
    label_queries: np.ndarray
    label_database: np.ndarray
    same_queries: np.ndarray
    same_database: np.ndarray
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return len({int(y) for y in self.labels[self.label_queries] if y >= 0}) >= 2


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# Served recall is also scored from these tighter shortlists. On an evaluation set of a few thousand
# images the service's shortlist is several per cent of the archive; at a million images it is
# 0.03 %, and what the codes lose of the re-ranking key's neighbours shows only as it tightens.
SHORTLISTS = (TOLERANT_SHORTLIST, SHORTLIST, 100, 50)


def _orders(
    rep: Rep, q: np.ndarray, d: np.ndarray, rng: np.random.Generator, exclude: np.ndarray, shortlists: tuple[int, ...]
) -> list[np.ndarray]:
    """The ranking of each query, and for a served method one per shortlist size (one draw of ties)."""
    if rep.kind == "chance":
        dist: np.ndarray = rng.random((len(q), len(d)))
    elif rep.kind in ("hamming", "served"):
        dist = hamming_distances(rep.codes[q], rep.codes[d])
    else:
        dist = cosine_distances(rep.vectors[q], rep.vectors[d])
    order = ranking(dist, rng, exclude)
    if rep.kind != "served":
        return [order]
    db = _unit(rep.vectors[d])
    if rep.variants is None:
        sims = _unit(rep.vectors[q]) @ db.T
    else:  # the best cosine over the query's variants, one variant at a time (memory)
        sims = np.full((len(q), len(d)), -np.inf)
        for v in range(rep.variants.shape[1]):
            np.maximum(sims, _unit(rep.variants[q, v]) @ db.T, out=sims)
    return [rerank(order, sims, s) for s in shortlists]


def _order(rep: Rep, q: np.ndarray, d: np.ndarray, rng: np.random.Generator, exclude: np.ndarray) -> np.ndarray:
    return _orders(rep, q, d, rng, exclude, rep.shortlists[:1])[0]


def _positions(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Where each query sits in the database (-1 when it is not in it)."""
    where = {int(j): n for n, j in enumerate(database.tolist())}
    return np.asarray([where.get(int(i), -1) for i in queries.tolist()], np.int64)


def _chunks(queries: np.ndarray, size: int = 256) -> list[np.ndarray]:
    return [queries[s : s + size] for s in range(0, len(queries), size)] or [queries]


def _with_intervals(
    row: dict[str, Any],
    scores: dict[str, list[np.ndarray]],
    rng: np.random.Generator,
    n: int,
    keep: dict[str, np.ndarray] | None = None,
) -> None:
    for key, parts in scores.items():
        values = np.concatenate(parts) if parts else np.zeros(0)
        if keep is not None:
            keep[key] = values
        mean, lo, hi = bootstrap(values, rng, n)
        row[key] = mean
        row[f"{key}_ci"] = [lo, hi]
        row[f"{key}_n"] = int(values.size)


def score(
    rep: Rep, proto: Protocol, seed: int = 0, n_boot: int = 1000, keep: dict[str, np.ndarray] | None = None
) -> dict[str, Any]:
    """Every figure of one method under ``proto`` (see the module docstring); ``keep``, when given,
    receives each measure's per-query values (for paired comparisons of methods on the same queries)."""
    rng = np.random.default_rng(seed)
    row: dict[str, Any] = {"name": rep.name, "kind": rep.kind, "nbits": rep.nbits, **rep.extra}
    if proto.labelled:
        scores: dict[str, list[np.ndarray]] = {"map_all": [], "map@100": [], "p@10": []}
        for q in _chunks(proto.label_queries):
            exclude = _positions(q, proto.label_database)
            order = _order(rep, q, proto.label_database, rng, exclude)
            labels_db = proto.labels[proto.label_database]
            for key, values in label_scores(order, proto.labels[q], labels_db, exclude=exclude).items():
                scores[key].append(values)
        _with_intervals(row, scores, rng, n_boot, keep)
    same: dict[str, list[np.ndarray]] = {"r@1": [], "r@10": []}
    tighter = rep.shortlists[1:]
    same.update({f"r@10_from_{s}": [] for s in tighter})
    db_patients = proto.patients[proto.same_database]
    for q in _chunks(proto.same_queries):
        exclude = _positions(q, proto.same_database)
        orders = _orders(rep, q, proto.same_database, rng, exclude, rep.shortlists or (0,))
        for key, values in same_patient_scores(orders[0], proto.patients[q], db_patients, exclude).items():
            same[key].append(values)
        for s, order in zip(tighter, orders[1:], strict=True):
            same[f"r@10_from_{s}"].append(same_patient_scores(order, proto.patients[q], db_patients, exclude)["r@10"])
    _with_intervals(row, same, rng, n_boot, keep)
    if rep.shortlists:
        row["shortlist"] = rep.shortlists[0]
    if rep.codes is not None:
        q = proto.label_queries if proto.labelled else proto.same_queries
        db = proto.label_database if proto.labelled else proto.same_database
        if len(q):
            row["ties@10"] = ties_at(hamming_distances(rep.codes[q[:512]], rep.codes[db]), 10)
        every = np.union1d(proto.same_database, proto.label_database)
        row["distinct_codes"] = distinct_codes(rep.codes[every])
        row["images"] = int(every.size)
    return row
