"""The ingest and query benchmarks: their helpers, and each command at a tiny size (figures printed,
exit 0). No timing is asserted: timings belong to the benchmarks' own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import redis

from plugin.bench.common import Latencies, synthetic_radiograph, time_calls, time_interleaved, write_study
from plugin.bench.index import make_codes
from plugin.bench.ingest import wait_searchable
from plugin.bench.query import VERSION, populate, study_uid
from plugin.search.filters import Filters
from plugin.search.replica import ReplicaIndex
from plugin.store import Store


def test_latency_summary_uses_every_call_and_reports_the_spread_of_repeat_medians() -> None:
    lat = Latencies("case")
    lat.add([0.001, 0.002, 0.003])
    lat.add([0.010, 0.020, 0.030])
    s = lat.summary()
    assert s["n"] == 6
    assert s["p50_ms"] == pytest.approx(np.percentile([1, 2, 3, 10, 20, 30], 50))
    assert s["p99_ms"] == pytest.approx(np.percentile([1, 2, 3, 10, 20, 30], 99))
    assert (s["p50_min_ms"], s["p50_max_ms"]) == pytest.approx((2.0, 20.0))
    assert Latencies("empty").summary() == {"n": 0}


def test_time_calls_discards_warmup_and_counts_failures_without_timing_them() -> None:
    seen: list[int] = []

    def call(i: int) -> None:
        seen.append(i)
        if i in (1, 6):
            raise RuntimeError("refused")

    lat = time_calls("case", call, count=3, warmup=2, repeats=2, progress=False)
    assert seen == list(range(8))  # each call gets its own index: warm-up 0-1, then 2-7
    assert lat.errors == 2
    assert [len(r) for r in lat.repeats] == [3, 2]


def test_interleaved_timing_runs_every_case_on_each_input_in_a_rotating_order() -> None:
    seen: list[tuple[str, int]] = []

    def case(name: str):  # noqa: ANN202
        def call(i: int) -> None:
            seen.append((name, i))
            if name == "b" and i == 3:
                raise RuntimeError("refused")

        return call

    rows = time_interleaved([("a", case("a")), ("b", case("b"))], count=2, warmup=1, repeats=2)
    # warm-up input 0 for both, then inputs 1-2 twice; the first case alternates with the input
    assert seen[:2] == [("a", 0), ("b", 0)]
    assert seen[2:6] == [("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert seen[6:] == seen[2:6]
    assert [r.name for r in rows] == ["a", "b"]
    assert [len(r) for r in rows[0].repeats] == [2, 2] and rows[0].errors == 0
    assert rows[1].summary()["n"] == 4 and rows[1].errors == 0
    rows = time_interleaved([("b", case("b"))], count=1, warmup=4, repeats=2)  # 3 fails in warm-up too
    assert rows[0].errors == 1 and rows[0].summary()["n"] == 2
    rows = time_interleaved([("b", case("b"))], count=1, warmup=3, repeats=2)
    assert rows[0].errors == 2 and rows[0].summary() == {"n": 0}


def test_generated_studies_are_valid_dicom_with_the_pixels_given(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [synthetic_radiograph(rng, 32) for _ in range(2)]
    assert all(img.min() >= 0 and img.max() <= 1 and img.shape == (32, 32) for img in images)
    study = write_study(tmp_path, images, index=3)
    assert len(study.files) == 2
    assert study.nbytes == sum(f.stat().st_size for f in study.files)
    for n, (path, img) in enumerate(zip(study.files, images, strict=True), start=1):
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study.study_uid
        assert int(ds.InstanceNumber) == n
        assert ds.Modality == "DX"
        np.testing.assert_array_equal(ds.pixel_array, (img * 4095).round().astype(np.uint16))
    other = write_study(tmp_path, images, index=3)
    assert other.study_uid != study.study_uid  # repeats never collide in a store


def test_populated_store_loads_in_the_replica_and_filters_agree_with_the_metadata(redis_client: redis.Redis) -> None:
    n = 3000
    store = Store(redis_client, namespace="benchtest")
    codes = make_codes(n, 64, "clustered", seed=1)
    populate(store, codes, seed=1)
    assert store.models.active() == VERSION
    assert store.codes.count(VERSION, "study") == n
    assert store.codes.get(VERSION, "study", study_uid(17)) == codes[17].tobytes()

    replica = ReplicaIndex(store, "study")
    replica.refresh()
    assert len(replica) == n
    f = Filters(modalities=("CT",), date_from="20100101", date_to="20141231")
    hits = replica.search(codes[5].tobytes(), 50, filters=f, exclude_uids=(study_uid(5),))
    assert hits, "a 3000-study store has CT studies from 2010-2014"
    for hit in hits:
        meta = store.records.study(hit.uid)
        assert "CT" in meta["modalities"].split(",")
        assert "20100101" <= meta["study_date"] <= "20141231"
        assert meta["n_instances"].isdigit()
    # Without the filter, the studies it left out are found too.
    unfiltered = {h.uid for h in replica.search(codes[5].tobytes(), 200)}
    assert any(
        "CT" not in store.records.study(u)["modalities"]
        or not "20100101" <= store.records.study(u)["study_date"] <= "20141231"
        for u in unfiltered
    )
    replica.close()


def test_wait_searchable_sees_study_codes_and_gives_up_on_missing_ones(redis_client: redis.Redis) -> None:
    store = Store(redis_client, namespace="benchwait")
    store.models.register("v1", 64)
    store.models.activate("v1")
    store.codes.upsert("v1", "study", "1.2.3", bytes(8))
    seen = wait_searchable(store, ["1.2.3"], timeout=5)
    assert set(seen) == {"1.2.3"}
    with pytest.raises(RuntimeError, match="1 of 2 studies not searchable"):
        wait_searchable(store, ["1.2.3", "1.2.4"], timeout=0.3)


def _bench(args: list[str], tmp_path: Path, timeout: float) -> tuple[subprocess.CompletedProcess[str], object]:
    out = tmp_path / "figures.json"
    env = {**os.environ, "DRH_DEVICE": "cpu"}
    env.pop("DRH_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "bench", *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_ingest_runs_at_a_tiny_size(tmp_path: Path) -> None:
    done, figures = _bench(
        ["ingest", "--studies", "2", "--images", "2", "--size", "64", "--repeats", "1", "--device", "cpu"],
        tmp_path,
        timeout=300,
    )
    out = done.stdout
    assert "DCMTK storescp (no fsync)" in out and "drh-pacs (fsync, enqueue)" in out
    assert "drh-pacs / storescp throughput ratio" in out
    assert "last C-STORE response -> last study searchable" in out
    assert "device cpu" in out
    # the other study and the warm-up one, never the reference itself
    assert "C-FIND similar on the last study: 2 answers (status success)" in out
    assert "tasks so far: " in out
    (rep,) = figures["repeats"]
    assert rep["images"] == 4
    assert rep["storescp"]["images_per_s"] > 0 and rep["drh_pacs"]["images_per_s"] > 0
    assert rep["last_searchable_s"] > 0


@pytest.mark.slow
def test_bench_query_runs_at_a_tiny_size(tmp_path: Path) -> None:
    done, figures = _bench(
        [
            "query",
            "--studies",
            "2K",
            "--kinds",
            "clustered",
            "--queries",
            "4",
            "--findscu-queries",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
        ],
        tmp_path,
        timeout=300,
    )
    out = done.stdout
    for row in ("pynetdicom assoc ", "pynetdicom assoc, filter", "findscu process ", "findscu process, filter"):
        assert row in out
    assert "serve ready (/ready 200)" in out
    (case,) = figures
    assert case["n"] == 2000 and case["replica_load_s"] > 0
    # the C-FIND rows measure the served re-ranking of the shipped layout model: its variants
    assert case["served_reranking"] == {"by": "variants", "variants": 27, "shortlist": 1000}
    lat = case["latency"]
    for name in (
        "pynetdicom assoc",
        "pynetdicom assoc, filter",
        "pynetdicom assoc, k=1",
        "pynetdicom assoc, TCP_NODELAY",
        "pynetdicom assoc, C-ECHO",
        "in-process search",
        "in-process search, filter",
    ):
        assert lat[name]["n"] == 8 and lat[name]["errors"] == 0, (name, lat[name])
    for name in ("findscu process", "findscu process, filter", "echoscu process"):
        assert lat[name]["n"] == 2 and lat[name]["errors"] == 0, (name, lat[name])
