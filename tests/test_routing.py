"""Models routed by modality and body part, with a real `drh-pacs worker` and Redis: each image is
hashed by its route's model, answers never mix anatomies, what no route takes is the general
model's or stored as "no model", and a hospital adds its own anatomy with `drh-pacs register`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from hashing import checkpoint
from hashing.encoder import Encoder
from hashing.train import main as train_main
from plugin.ops.metrics import render
from plugin.ops.status import gather, render_text
from plugin.search import query as q
from plugin.search.errors import QueryError
from plugin.search.routed import RoutedIndex
from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.processes import wait_until
from tests.helpers.workers import app_for, send, worker_env

pytestmark = pytest.mark.slow


def _archive(folder: Path, kinds: list[tuple[str, str]], per_kind: int = 3) -> dict[tuple[str, str], list]:
    """``per_kind`` one-image studies of each (modality, body part), every one its own patient."""
    images = fixture_images()
    out: dict[tuple[str, str], list] = {}
    n = 0
    for modality, body_part in kinds:
        for _ in range(per_kind):
            study = make_study(
                folder, [images[n % len(images)]], patient_id=f"P{n}", modality=modality, body_part=body_part
            )
            out.setdefault((modality, body_part), []).append(study)
            n += 1
    return out


def _settled(store, studies: list, state: str = "indexed") -> bool:
    sops = [sop for s in studies for sop in s.sop_uids]
    return all(store.records.instance(sop).get("state") == state for sop in sops)


def _version_of(store, study) -> str:
    return store.records.instance(study.sop_uids[0]).get("indexed_version", "")


def _similar_studies(store, indexes, study, k: int = 20) -> q.Answer:
    return q.run_similar(q.SimilarQuery("STUDY", study.study_uid, k), store, indexes)


def test_each_image_is_hashed_by_its_routes_model_and_answers_never_mix_anatomies(
    redis_server, store, worker_factory, tmp_path
):
    kinds = [("DX", "CHEST"), ("US", "BREAST"), ("OT", "HEAD")]
    archive = _archive(tmp_path / "in", kinds)
    every = [s for studies in archive.values() for s in studies]
    worker_factory("routes")  # the settings' defaults: shipped chest, breast-ultrasound and general models
    app = app_for(redis_server.url, tmp_path / "data")
    for study in every:
        send(app, study)
    wait_until(lambda: _settled(store, every), 180, what="every image indexed")

    chest, breast, general = (Encoder.load(p, device="cpu") for p in ("", "shipped:us-breast", "shipped:general"))
    assert store.models.active_routes() == {
        "chest-xr": chest.version,
        "us-breast": breast.version,
        "general": general.version,
    }
    expected = {("DX", "CHEST"): ("chest-xr", chest), ("US", "BREAST"): ("us-breast", breast)}
    expected[("OT", "HEAD")] = ("general", general)
    for kind, studies in archive.items():
        route, enc = expected[kind]
        for study in studies:
            record = store.records.instance(study.sop_uids[0])
            assert (record["route"], record["indexed_version"]) == (route, enc.version), kind
            others = [e.version for r, e in expected.values() if r != route]
            assert not any(store.codes.has(v, "image", study.sop_uids[0]) for v in others)

    wait_until(lambda: all(store.codes.has(_version_of(store, s), "study", s.study_uid) for s in every), 60,
               what="every study pooled")  # fmt: skip
    indexes = {level: RoutedIndex(store, level) for level in ("study", "image")}
    for kind, studies in archive.items():
        route, enc = expected[kind]
        answer = _similar_studies(store, indexes, studies[0])
        assert (answer.route, answer.version) == (route, enc.version)
        assert sorted(r.study_uid for r in answer) == sorted(s.study_uid for s in studies[1:])  # its kind only
        image = q.run_similar(q.SimilarQuery("IMAGE", studies[0].sop_uids[0], 20), store, indexes)
        assert image.route == route and {r.study_uid for r in image} == {s.study_uid for s in studies[1:]}

    figures = gather(store)
    routes = {r["route"]: r for r in figures["routes"]}
    assert routes["general"]["general"] and routes["us-breast"]["version"] == breast.version
    assert "US" in routes["us-breast"]["serves"] and "BREAST" in routes["us-breast"]["serves"]
    lines = [line for line in render(figures).decode().splitlines() if line.startswith("drh_index_codes{")]
    us_images = [line for line in lines if 'route="us-breast"' in line and 'level="image"' in line]
    assert len(us_images) == 1 and 'active="1"' in us_images[0] and us_images[0].endswith(" 3.0")


def test_with_unrouted_none_an_image_no_route_takes_is_stored_counted_and_refused_with_a_reason(
    redis_server, store, worker_factory, tmp_path
):
    archive = _archive(tmp_path / "in", [("DX", "CHEST"), ("OT", "HEAD")], per_kind=2)
    every = [s for studies in archive.values() for s in studies]
    broken = _archive(tmp_path / "broken", [("DX", "CHEST")], per_kind=1)[("DX", "CHEST")][0]
    ds = pydicom.dcmread(broken.files[0])
    ds.PixelData = ds.PixelData[:100]  # a decode that fails: counted under its modality too
    ds.save_as(broken.files[0])
    worker_factory("none", DRH_UNROUTED="none", DRH_EXTRA_MODELS="")
    app = app_for(redis_server.url, tmp_path / "data")
    for study in [*every, broken]:
        send(app, study)
    chest_studies, other = archive[("DX", "CHEST")], archive[("OT", "HEAD")]
    wait_until(lambda: _settled(store, chest_studies) and _settled(store, other, "no-model"), 120, what="settled")
    assert list(store.models.active_routes()) == ["chest-xr"]  # no general model registered
    for study in other:
        record = store.records.instance(study.sop_uids[0])
        assert record["modality"] == "OT" and Path(record["path"]).exists()  # kept, waiting for a model
        assert not store.codes.has(store.models.active("chest-xr"), "image", study.sop_uids[0])
    figures = gather(store)
    assert figures["no_model"] == {"OT": 2} and figures["tasks"]["index_instance"]["no-model"] == 2
    wait_until(lambda: store.records.instance(broken.sop_uids[0]).get("state") == "failed", 60, what="failure")
    figures = gather(store)
    assert figures["by_modality"]["OT"] == {"indexed": 0, "failed": 0, "ignored": 0, "no-model": 2}
    assert figures["by_modality"]["DX"] == {"indexed": 2, "failed": 1, "ignored": 0, "no-model": 0}
    text = render(figures).decode()
    assert 'drh_no_model_instances{modality="OT"} 2.0' in text
    assert 'drh_instances_by_modality_total{modality="DX",outcome="failed"} 1.0' in text
    assert "by modality" in render_text(figures)
    indexes = {level: RoutedIndex(store, level) for level in ("study", "image")}
    with pytest.raises(QueryError) as refused:
        q.run_similar(q.SimilarQuery("IMAGE", other[0].sop_uids[0], 5), store, indexes)
    assert refused.value.reason == "no-model" and "no model" in refused.value.comment


def test_a_hospital_adds_its_own_anatomy_trains_and_registers_it_without_code(
    redis_server, store, worker_factory, tmp_path
):
    # Mammograms arrive before any model serves them: the general model takes them for now.
    mammograms = _archive(tmp_path / "mg", [("MG", "BREAST")], per_kind=6)[("MG", "BREAST")]
    chests = _archive(tmp_path / "cxr", [("DX", "CHEST")], per_kind=4)[("DX", "CHEST")]
    worker_factory("hospital", DRH_EXTRA_MODELS="")
    app = app_for(redis_server.url, tmp_path / "data")
    for study in mammograms + chests:
        send(app, study)
    wait_until(lambda: _settled(store, mammograms + chests), 120, what="first indexing")
    general = store.models.active("general")
    assert {store.records.instance(s.sop_uids[0])["route"] for s in mammograms} == {"general"}

    # 1. train on the folder of DICOM files, no labels  2. register it for MG + BREAST
    out = tmp_path / "mg.pt"
    args = ["--data", str(tmp_path / "mg"), "--out", str(out), "--input-size", "32", "--batch-size", "4"]
    more = ["--epochs", "1", "--val-fraction", "0.34", "--bits", "16", "--threads", "1", "--no-progress"]
    assert train_main([*args, *more, "--version", "mg-site-v1"]) == 0
    env = worker_env(redis_server.url, tmp_path / "data")
    # trained without saying what it serves: registering it as is would take every image
    bare = subprocess.run([sys.executable, "-m", "plugin.cli", "register", str(out)], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert bare.returncode == 1 and "would take every image" in bare.stderr
    register = [sys.executable, "-m", "plugin.cli", "register", str(out), "--route", "mg-breast"]
    done = subprocess.run(
        [*register, "--modality", "MG", "--body-part", "BREAST", "--wait"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mg-site-v1 registered for route mg-breast (MG, BREAST)" in done.stdout
    assert "complete" in done.stdout and "6/6 instances" in done.stdout  # the mammograms only

    assert store.models.active("mg-breast") == "mg-site-v1" and store.models.active("general") == general
    assert checkpoint.load(out)["version"] == "mg-site-v1"
    for study in mammograms:
        sop = study.sop_uids[0]
        assert store.records.instance(sop)["route"] == "mg-breast"
        assert store.codes.has("mg-site-v1", "image", sop) and not store.codes.has(general, "image", sop)
        assert not store.codes.has(general, "study", study.study_uid)  # left the general index entirely
    indexes = {level: RoutedIndex(store, level) for level in ("study", "image")}
    answer = _similar_studies(store, indexes, mammograms[0])
    assert answer.route == "mg-breast" and answer.version == "mg-site-v1"
    assert sorted(r.study_uid for r in answer) == sorted(s.study_uid for s in mammograms[1:])
    # a new mammogram goes straight to the new route
    late = _archive(tmp_path / "late", [("MG", "BREAST")], per_kind=1)[("MG", "BREAST")]
    send(app, late[0])
    wait_until(lambda: _settled(store, late), 60, what="late mammogram")
    assert store.records.instance(late[0].sop_uids[0])["route"] == "mg-breast"
