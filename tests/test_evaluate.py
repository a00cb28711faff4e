"""Metrics against hand-computed and brute-force values, baselines, and ``drh-pacs evaluate`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hashing import baselines, checkpoint
from hashing.bits import pack
from hashing.evaluate import main as evaluate_main
from hashing.metrics import average_precision, hamming_distances, retrieval_metrics, ties_at
from hashing.train import main as train_main
from tests.helpers.datasets import fixture_args, make_fixture_dataset


def test_average_precision_by_hand() -> None:
    rel = np.array([[True, False, True, False], [False, False, False, False], [False, True, False, False]])
    ap = average_precision(rel)
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert ap[1] == 0.0
    assert ap[2] == pytest.approx(0.5)
    assert average_precision(rel, 1)[0] == pytest.approx(1.0) and average_precision(rel, 1)[2] == 0.0


def _brute_force(dist: np.ndarray, ql: np.ndarray, dl: np.ndarray, k: int) -> tuple[float, float, float]:
    maps, p10s, h2s = [], [], []
    for i in range(len(ql)):
        order = sorted(range(len(dl)), key=lambda j: (dist[i, j], j))
        hits, precs = 0, []
        for r, j in enumerate(order, 1):
            if dl[j] == ql[i]:
                hits += 1
                precs.append(hits / r)
        maps.append(sum(precs) / len(precs) if precs else 0.0)
        p10s.append(sum(dl[j] == ql[i] for j in order[:k]) / k)
        within = [j for j in range(len(dl)) if dist[i, j] <= 2]
        h2s.append(sum(dl[j] == ql[i] for j in within) / len(within) if within else 0.0)
    return float(np.mean(maps)), float(np.mean(p10s)), float(np.mean(h2s))


def test_metrics_match_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    qc = pack(rng.integers(0, 2, (20, 16)))
    dc = pack(rng.integers(0, 2, (150, 16)))
    ql, dl = rng.integers(0, 3, 20), rng.integers(0, 3, 150)
    dist = hamming_distances(qc, dc)
    m = retrieval_metrics(dist, ql, dl, hamming=True)
    mp, p10, h2 = _brute_force(dist, ql, dl, 10)
    assert m["map_all"] == pytest.approx(mp) and m["precision@10"] == pytest.approx(p10)
    assert m["precision_hamming2"] == pytest.approx(h2)
    pr = m["pr_curve"]
    assert pr["recall"][-1] == pytest.approx(1.0, abs=1e-4) and len(pr["precision"]) == len(pr["cutoffs"])


def test_perfect_codes_score_one() -> None:
    labels = np.repeat(np.arange(3), 10)
    codes = pack(
        np.repeat(np.eye(3, 16, dtype=np.uint8) * 0 + np.array([[0] * 16, [1] * 16, [1] * 8 + [0] * 8]), 10, 0)
    )
    m = retrieval_metrics(hamming_distances(codes, codes), labels, labels, hamming=True)
    assert m["map_all"] == 1.0 and m["precision@10"] == 1.0 and m["precision_hamming2"] == 1.0
    # ...and yet every class collapsed onto one code: the ranking inside a class is tie-breaking.
    assert m["ties_at_10"] == 10


def test_ties_at_k_counts_the_candidates_at_the_cut() -> None:
    dist = np.array([[0, 1, 2, 3, 3, 3, 9], [5, 5, 5, 5, 5, 5, 5], [0, 0, 1, 2, 4, 5, 6]])
    # 3rd nearest: distance 2 (one item), 5 (all seven), 1 (one item); median of 1, 7, 1.
    assert ties_at(dist, 3) == 1.0
    assert ties_at(dist[1:2], 3) == 7.0
    assert ties_at(dist, 100) == 1.0  # k past the database: the farthest distance


def test_itq_beats_pca_signs_and_lsh_is_seeded() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 32)) @ rng.standard_normal((32, 32))
    itq = baselines.fit_itq(x, 16, iterations=30)
    assert itq.encode(x).shape == (400, 2)
    pca = baselines.fit_itq(x, 16, iterations=0)
    assert baselines.itq_objective(x, itq) < baselines.itq_objective(x, pca)
    a, b = baselines.fit_lsh(x, 16, seed=3), baselines.fit_lsh(x, 16, seed=3)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))
    with pytest.raises(ValueError):
        baselines.fit_itq(x, 64)


def test_evaluate_command(tmp_path: Path) -> None:
    data = make_fixture_dataset(tmp_path / "cxr")
    drh, model, csq = tmp_path / "drh.pt", tmp_path / "model.pt", tmp_path / "csq.pt"
    train_main(fixture_args(data, drh, "--epochs", "1"))
    train_main(fixture_args(data, model, "--method", "dmih", "--init", str(drh), "--epochs", "1"))
    train_main(fixture_args(data, csq, "--method", "csq", "--epochs", "1"))
    out = tmp_path / "eval"
    args = ["--data", str(data), "--model", str(model), "--model", str(csq), "--studies", "--record", "--out", str(out)]
    assert evaluate_main([*args, "--device", "cpu"]) == 0
    res = json.loads((out / "evaluation.json").read_text())
    assert "test split" in res["protocol"] and res["queries"] == 3 and res["database"] == 9
    kinds = [r["kind"] for r in res["results"]]
    assert kinds == ["drh", "float", "lsh", "itq", "csq"]
    for r in res["results"]:
        assert 0.0 <= r["map_all"] <= 1.0 and "map@100" in r and "precision@10" in r
        assert ("precision_hamming2" in r) == (r["kind"] != "float")
    assert [r["kind"] for r in res["studies"]["results"]] == ["dmih", "drh-pooled"]
    assert res["studies"]["query_bags"] == 3
    assert (out / "pr.png").stat().st_size > 1000
    recorded = checkpoint.load(model)["metrics"]
    assert [r["kind"] for r in recorded["results"]] == ["drh", "float", "lsh", "itq"]
    assert recorded["results"][0]["map_all"] == res["results"][0]["map_all"]
    assert [r["kind"] for r in recorded["studies"]["results"]] == ["dmih", "drh-pooled"]
    assert [r["kind"] for r in checkpoint.load(csq)["metrics"]["results"]] == ["csq"]
