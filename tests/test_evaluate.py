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


def test_random_ties_do_not_flatter_collapsed_codes() -> None:
    """Every database item ties: in database order the first ten would all be relevant (sorted by
    label); at random they are relevant a third of the time, as for chance."""
    from hashing.metrics import label_scores, ranking

    db_labels = np.repeat(np.arange(3), 300)
    q_labels = np.zeros(200, np.int64)
    dist = np.zeros((200, 900), np.int32)
    in_db_order = np.argsort(dist, axis=1, kind="stable")
    assert label_scores(in_db_order, q_labels, db_labels)["p@10"].mean() == 1.0
    random_order = ranking(dist, np.random.default_rng(0))
    assert abs(label_scores(random_order, q_labels, db_labels)["p@10"].mean() - 1 / 3) < 0.05


def test_same_patient_recall_by_hand() -> None:
    from hashing.metrics import ranking, same_patient_scores

    patients = np.array(["a", "a", "b", "c", "c", "d"])
    # distances from the queries 0 (patient a), 2 (b, alone) and 3 (c) to the six images
    dist = np.array([[0, 5, 1, 2, 3, 4], [1, 2, 0, 3, 4, 5], [3, 4, 1, 0, 2, 5]], np.float64)
    exclude = np.array([0, 2, 3])
    order = ranking(dist, np.random.default_rng(0), exclude)
    s = same_patient_scores(order, patients[[0, 2, 3]], patients, exclude)
    # query 0: its partner 1 is the 5th nearest other image; query 3: partner 4 is 2nd; b has no partner
    assert s["r@1"].tolist() == [0.0, 0.0] and s["r@10"].tolist() == [1.0, 1.0]


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_queries() -> None:
    from hashing.metrics import bootstrap

    rng = np.random.default_rng(0)
    few = bootstrap(rng.random(20) < 0.5, np.random.default_rng(1))
    many = bootstrap(rng.random(2000) < 0.5, np.random.default_rng(1))
    assert few[1] <= few[0] <= few[2] and many[1] <= many[0] <= many[2]
    assert many[2] - many[1] < few[2] - few[1]


def test_paired_bootstrap_sees_a_shift_that_overlapping_intervals_hide() -> None:
    from hashing.metrics import bootstrap, paired_bootstrap

    rng = np.random.default_rng(0)
    a = rng.random(300)  # per-query figures of one method: most of their spread is the queries'
    b = np.clip(a - 0.02 + rng.normal(0, 0.005, a.size), 0, 1)  # another, 0.02 lower on nearly every query
    _, lo_a, hi_a = bootstrap(a, np.random.default_rng(1))
    _, lo_b, hi_b = bootstrap(b, np.random.default_rng(1))
    assert lo_a < hi_b and lo_b < hi_a  # their own intervals overlap...
    diff, lo, hi = paired_bootstrap(a, b, np.random.default_rng(1))
    assert abs(diff - (a.mean() - b.mean())) < 1e-12 and 0 < lo <= diff <= hi  # ...the paired one excludes 0
    assert paired_bootstrap(a, a, np.random.default_rng(1)) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same queries"):
        paired_bootstrap(a, b[:-1], np.random.default_rng(1))


def test_evaluate_command(tmp_path: Path) -> None:
    data = make_fixture_dataset(tmp_path / "cxr")
    drh, model, csq = tmp_path / "drh.pt", tmp_path / "model.pt", tmp_path / "csq.pt"
    train_main(fixture_args(data, drh, "--epochs", "1", "--version", "drh-a"))
    train_main(
        fixture_args(data, model, "--method", "dmih", "--init", str(drh), "--epochs", "1", "--version", "dmih-b")
    )
    train_main(fixture_args(data, csq, "--method", "csq", "--epochs", "1", "--version", "csq-c"))
    out = tmp_path / "eval"
    args = ["--data", str(data), "--model", str(model), "--model", str(csq), "--studies", "--record", "--paired"]
    args += ["--out", str(out)]
    assert evaluate_main([*args, "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    res = json.loads((out / "evaluation.json").read_text())
    assert "test split" in res["protocol"]["how"] and res["protocol"]["queries"] == 3 and res["images"] == 12
    names = [r["name"] for r in res["results"]]
    assert names[:3] == ["chance (random ranking)", "thumbnail 32x32 cosine", "thumbnail 32x32 LSH 64"]
    assert any(n.startswith("dmih-b served") for n in names) and any(n.startswith("csq-c codes") for n in names)
    assert any(n.startswith("ITQ 16 on dmih-b") for n in names), "row names carry the model's version"
    for r in res["results"]:
        assert 0.0 <= r["map_all"] <= 1.0 and r["map_all_ci"][0] <= r["map_all"] <= r["map_all_ci"][1]
        assert r["r@10_n"] == 0  # no test patient has a second image
        assert ("ties@10" in r) == (r["kind"] in ("hamming", "served"))
        assert ("r@10_from_50" in r) == (r["kind"] == "served")  # recall as the shortlist tightens
    (pair,) = res["paired"]  # the first model's served ranking against the second's, query by query
    rows = {r["name"]: r for r in res["results"]}
    first, second = rows[pair["a"]], rows[pair["b"]]
    assert pair["a"].startswith("dmih-b served") and pair["b"].startswith("csq-c served")
    assert abs(pair["map_all_diff"] - (first["map_all"] - second["map_all"])) < 1e-9
    assert pair["map_all_diff_ci"][0] <= pair["map_all_diff"] <= pair["map_all_diff_ci"][1]
    assert pair["map_all_n"] == first["map_all_n"] == 3 and "r@10_diff" not in pair  # no patient to find
    tolerant = "served tolerant ({}, top 1000 re-ranked by 27 query variants)"
    assert [r["name"] for r in res["studies"]["results"]][2:] == [
        "dmih-b DMIH study codes",
        "dmih-b " + tolerant.format("DMIH study codes"),
        "dmih-b image codes pooled per study",
        "dmih-b " + tolerant.format("image codes pooled per study"),
        "csq-c image codes pooled per study",
        "csq-c " + tolerant.format("image codes pooled per study"),
    ]
    assert res["studies"]["protocol"]["studies"] == 10  # person100's three training images are one study
    assert (out / "evaluation.png").stat().st_size > 1000
    recorded = checkpoint.load(model)["metrics"]
    assert {r["name"] for r in recorded["results"]} >= {"chance (random ranking)", "thumbnail 32x32 cosine"}
    assert not any("csq-c" in r["name"] for r in recorded["results"])


def test_evaluate_a_dicom_folder_without_splits_or_labels(tmp_path: Path) -> None:
    from tests.helpers.dicomgen import fixture_images, make_study

    archive = tmp_path / "archive"
    images = fixture_images()
    for n in range(6):
        make_study(archive / f"p{n}", images[2 * n : 2 * n + 2], patient_id=f"PAT{n}")
    out = tmp_path / "eval"
    assert evaluate_main(["--data", str(archive), "--out", str(out), "--max-queries", "8", "--no-progress"]) == 0
    res = json.loads((out / "evaluation.json").read_text())
    assert res["source"] == "dicom" and res["protocol"]["queries"] == 8 and res["images"] == 12
    thumbs = next(r for r in res["results"] if r["name"] == "thumbnail 32x32 cosine")
    assert thumbs["r@10_n"] == 8 and "map_all" not in thumbs  # every patient has two films; no labels


def _first_image_queries(patients: np.ndarray):  # noqa: ANN202
    """Image 0 as the only query, every image the database, no labels."""
    from hashing.scoring import Protocol

    n, everything = len(patients), np.arange(len(patients))
    return Protocol(
        labels=np.full(n, -1),
        patients=patients,
        label_queries=np.array([0]),
        label_database=everything,
        same_queries=np.array([0]),
        same_database=everything,
    )


def test_served_recall_is_also_scored_from_tighter_shortlists() -> None:
    """A partner the codes rank 80th is found by the re-ranking from 300 and 100 codes, not from 50:
    what happens to an answer as the archive grows and the same shortlist becomes a smaller part of it."""
    from hashing.scoring import SHORTLISTS, Rep, score

    assert SHORTLISTS == (1000, 300, 100, 50)
    n = 401
    bits = np.zeros((n, 64), np.uint8)
    bits[1:80, :2] = 1  # 79 strangers at Hamming distance 2 from the query (image 0)
    bits[80, :5] = 1  # its patient's other film at distance 5: the 80th nearest
    bits[81:, :10] = 1  # the rest at distance 10
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 16))
    vectors[80] = vectors[0]  # ...which looks exactly like it
    patients = np.array(["p"] + [f"s{i}" for i in range(1, 80)] + ["p"] + [f"s{i}" for i in range(81, n)], dtype=object)
    proto = _first_image_queries(patients)
    row = score(Rep("m served", "served", codes=pack(bits), vectors=vectors, nbits=64), proto, n_boot=10)
    assert row["r@10"] == 1.0 and row["r@10_from_100"] == 1.0 and row["r@10_from_50"] == 0.0
    codes_only = score(Rep("m codes", "hamming", codes=pack(bits), nbits=64), proto, n_boot=10)
    assert codes_only["r@10"] == 0.0 and "r@10_from_100" not in codes_only


def test_tolerant_served_recall_takes_the_best_variant_from_a_larger_shortlist() -> None:
    """The patient's other film is the 500th nearest code and looks like a *variant* of the query (its
    shifted self), not like the query: the tolerant re-ranking finds it from 1,000 codes, not from 300,
    and the plain re-ranking not at all."""
    from hashing.scoring import Rep, score

    n = 1201
    bits = np.zeros((n, 64), np.uint8)
    bits[1:500, :2] = 1  # 499 strangers nearer than the partner
    bits[500, :5] = 1  # the patient's other film: the 500th nearest code
    bits[501:, :10] = 1
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 16))
    variants = rng.standard_normal((n, 3, 16))
    variants[:, 1] = vectors  # the untransformed variant is the image's own vector
    variants[0, 2] = vectors[500]  # the query, transformed, looks exactly like its partner
    patients = np.array([f"s{i}" for i in range(n)], dtype=object)
    patients[0] = patients[500] = "p"
    proto = _first_image_queries(patients)
    tolerant = score(Rep("t", "served", pack(bits), vectors, 64, variants=variants), proto, n_boot=10)
    assert tolerant["shortlist"] == 1000
    assert tolerant["r@10"] == 1.0 and tolerant["r@1"] == 1.0 and tolerant["r@10_from_300"] == 0.0
    plain = score(Rep("p", "served", pack(bits), vectors, 64), proto, n_boot=10)
    assert plain["shortlist"] == 300 and plain["r@10"] == 0.0 and "r@10_from_1000" not in plain


def test_study_rows_of_a_model_with_variants_are_also_scored_as_served() -> None:
    """A study reference is served re-ranked by its images' variants pooled: the study table gets
    that row beside the plain one, with the pooling the query process uses; a model without variants
    keeps the plain row alone."""
    import torch

    from hashing.bits import pooled_variants, quantize_rerank
    from hashing.evaluate import study_reps

    rng = np.random.default_rng(0)
    heads = torch.as_tensor(rng.standard_normal((5, 16)), dtype=torch.float32)
    keys = rng.standard_normal((5, 8)).astype(np.float32)
    stored = quantize_rerank(rng.standard_normal((5, 3, 8)))
    bags = [[0, 1, 2], [3], [4]]
    parts = {"heads": heads, "keys": keys, "variants": stored}
    reps = study_reps({"version": "m"}, parts, bags, torch.device("cpu"))
    assert [r.name for r in reps] == [
        "m image codes pooled per study",
        "m served tolerant (image codes pooled per study, top 1000 re-ranked by 27 query variants)",
    ]
    plain, tolerant = reps
    assert plain.variants is None and tolerant.shortlists[0] == 1000
    assert np.array_equal(tolerant.codes, plain.codes) and np.array_equal(tolerant.vectors, plain.vectors)
    assert np.array_equal(tolerant.variants[0], pooled_variants(stored[[0, 1, 2]]).astype(np.float32))
    assert np.array_equal(tolerant.variants[1], stored[3].astype(np.float32))  # one image: its own variants
    assert [r.name for r in study_reps({"version": "m"}, {**parts, "variants": None}, bags, torch.device("cpu"))] == [
        "m image codes pooled per study"
    ]
