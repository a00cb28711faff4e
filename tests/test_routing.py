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
from hashing.preprocess import evenly_spaced
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
    # Chest films as modalities also send them: BodyPartExamined THORAX, or none and a study
    # description that says CHEST. The chest model takes them too.
    spelled = _archive(tmp_path / "spelled", [("DX", "THORAX"), ("CR", "")], per_kind=1)
    undescribed = spelled[("CR", "")][0]
    ds = pydicom.dcmread(undescribed.files[0])
    del ds.BodyPartExamined
    ds.StudyDescription = "XR CHEST PA"
    ds.save_as(undescribed.files[0], enforce_file_format=True)
    archive[("DX", "CHEST")] += [s for studies in spelled.values() for s in studies]
    # A DX whose header names no body part anywhere: the general model's, and counted as such.
    (portable,) = _archive(tmp_path / "portable", [("DX", "")], per_kind=1)[("DX", "")]
    ds = pydicom.dcmread(portable.files[0])
    del ds.BodyPartExamined
    ds.StudyDescription = "XR PORTABLE"
    ds.save_as(portable.files[0], enforce_file_format=True)
    archive[("OT", "HEAD")].append(portable)
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
    assert figures["by_modality"]["DX"]["to-general"] == 1 and figures["by_modality"]["DX"]["indexed"] == 5
    assert "to general: read by the general model though a route takes their modality" in render_text(figures)
    routes = {r["route"]: r for r in figures["routes"]}
    assert routes["general"]["general"] and routes["us-breast"]["version"] == breast.version
    assert "US" in routes["us-breast"]["serves"] and "BREAST" in routes["us-breast"]["serves"]
    lines = [line for line in render(figures).decode().splitlines() if line.startswith("drh_index_codes{")]
    us_images = [line for line in lines if 'route="us-breast"' in line and 'level="image"' in line]
    assert len(us_images) == 1 and 'active="1"' in us_images[0] and us_images[0].endswith(" 3.0")


def test_images_falling_back_to_the_general_model_are_logged_once_per_kind_a_while(monkeypatch, caplog) -> None:
    """Every fall-back is counted; the worker log shows each kind (modality, body part) once in a
    while, so a hospital's hand and knee films do not bury it."""
    from workers import batching

    monkeypatch.setattr(batching, "_fell_back_logged", {})
    clock = [1000.0]
    monkeypatch.setattr(batching, "_clock", lambda: clock[0])

    def item(sop: str, body: str) -> batching.Item:
        ds = pydicom.Dataset()
        ds.Modality, ds.BodyPartExamined = "DX", body
        return batching.Item(sop, "1.2.3", "/spool/x.dcm", "MODALITY", 0.0, ds=ds)

    caplog.set_level("INFO", logger=batching.log.name)
    hands = [item(f"1.2.{i}", "HAND") for i in range(3)]
    assert [batching.log_fell_back(it, ("DX", "HAND", "")) for it in hands] == [True, False, False]
    assert batching.log_fell_back(item("1.2.9", "KNEE"), ("DX", "KNEE", ""))  # another kind
    clock[0] += batching.FELL_BACK_LOG_SECONDS
    assert batching.log_fell_back(hands[0], ("DX", "HAND", ""))  # shown again after the pause
    logged = [r.getMessage() for r in caplog.records if "to the general model" in r.getMessage()]
    assert len(logged) == 3 and "1.2.0" in logged[0] and "'HAND'" in logged[0] and "counted as to-general" in logged[0]


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
    assert figures["by_modality"]["OT"] == {"indexed": 0, "to-general": 0, "failed": 0, "ignored": 0, "no-model": 2}
    assert figures["by_modality"]["DX"] == {"indexed": 2, "to-general": 0, "failed": 1, "ignored": 0, "no-model": 0}
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
        series_uid = store.records.instance(sop)["series_uid"]
        assert store.codes.has("mg-site-v1", "series", series_uid)
        assert not store.codes.has(general, "series", series_uid)
    indexes = {level: RoutedIndex(store, level) for level in ("study", "image")}
    answer = _similar_studies(store, indexes, mammograms[0])
    assert answer.route == "mg-breast" and answer.version == "mg-site-v1"
    assert sorted(r.study_uid for r in answer) == sorted(s.study_uid for s in mammograms[1:])
    # a new mammogram goes straight to the new route
    late = _archive(tmp_path / "late", [("MG", "BREAST")], per_kind=1)[("MG", "BREAST")]
    send(app, late[0])
    wait_until(lambda: _settled(store, late), 60, what="late mammogram")
    assert store.records.instance(late[0].sop_uids[0])["route"] == "mg-breast"


def test_an_archive_indexed_before_routes_is_sorted_into_the_routes_that_take_it(
    redis_server, store, worker_factory, tmp_path
):
    from tests.helpers.archive import Planned, index_archive

    # An older release hashed everything with its one model: chest films, breast ultrasound, head CT.
    chest = Encoder.load(None, device="cpu")
    store.models.register(chest.version, chest.nbits, rerank_dim=chest.rerank_dim)  # no route then
    store.client.set(store.keys.active(), chest.version)
    images = fixture_images()
    kinds = [("DX", "CHEST")] * 3 + [("US", "BREAST")] * 2 + [("OT", "HEAD")] * 2
    plan = [Planned(f"P{n}", [images[n]], modality, body_part=part) for n, (modality, part) in enumerate(kinds)]
    plan.append(Planned("P9", images[:12], "CT", body_part="HEAD"))  # a 12-slice series, each slice its own code
    plan.append(Planned("P10", [images[7]], "DX", body_part="THORAX"))  # a chest film spelled otherwise
    studies = index_archive(store, chest, tmp_path / "spool", plan, register=False)
    dx, us, ot, (ct,) = studies[:3], studies[3:5], studies[5:7], studies[7:8]
    # Its record is from before the body part routing reads was kept: read by its defined term, CHEST.
    thorax = studies[8]
    store.client.hdel(store.keys.instance(thorax.sop_uids[0]), "route_body_part")
    dx = [*dx, thorax]
    sample = {"DRH_MAX_FRAMES_PER_SERIES": "4"}
    worker_factory("reroute", **sample)
    env = worker_env(redis_server.url, tmp_path / "data", **sample)

    def reroute(*args: str, **extra: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "plugin.cli", "reroute", *args]
        return subprocess.run(command, env={**env, **extra}, capture_output=True, text=True, timeout=300)

    dry = reroute("--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "16 stored image(s) are not in the route that takes them now" in dry.stdout
    assert "2  US     chest-xr -> us-breast" in dry.stdout and "2  OT     chest-xr -> general" in dry.stdout
    assert "12  CT     chest-xr -> general" in dry.stdout
    assert store.codes.count(chest.version, "image") == 20  # a dry run moves nothing

    done = reroute()
    assert done.returncode == 0, done.stdout + done.stderr
    breast, general = store.models.active("us-breast"), store.models.active("general")
    assert f"re-sort into {breast} (route us-breast): complete, 2/2 instances" in done.stdout
    assert f"re-sort into {general} (route general): complete, 14/14 instances" in done.stdout
    assert f"re-sort into {breast}: complete, 2/2 instances" in render_text(gather(store))  # the last one
    assert store.codes.count(chest.version, "image") == 4 and store.codes.count(chest.version, "study") == 4
    # the CT series is a volume now: 4 evenly spaced slices encoded, the others answered through them
    records = store.records.instances(ct.sop_uids)
    sampled = [s for s, r in zip(ct.sop_uids, records, strict=True) if r["state"] == "indexed"]
    assert sampled == [ct.sop_uids[i] for i in evenly_spaced(12, 4)]
    assert all(store.codes.has(general, "image", s) for s in sampled)
    assert store.codes.count(general, "image") == 2 + 4 and store.codes.count(general, "series") == 2 + 1
    others = [r for s, r in zip(ct.sop_uids, records, strict=True) if s not in sampled]
    assert all(r["state"] == "volume-slice" and r["represented_by"] in sampled for r in others)
    assert {r["route"] for r in records} == {"general"}
    assert store.codes.count(chest.version, "series") == 4
    for group, version, route in ((us, breast, "us-breast"), (ot, general, "general")):
        for study in group:
            record = store.records.instance(study.sop_uids[0])
            assert record["indexed_version"] == version and record["route"] == route
            assert store.codes.has(version, "study", study.study_uid)
            assert not store.codes.has(chest.version, "study", study.study_uid)
    indexes = {level: RoutedIndex(store, level) for level in ("study", "series", "image")}
    answer = _similar_studies(store, indexes, dx[0])
    assert answer.route == "chest-xr" and sorted(r.study_uid for r in answer) == sorted(s.study_uid for s in dx[1:])
    answer = _similar_studies(store, indexes, us[0])
    assert answer.route == "us-breast" and [r.study_uid for r in answer] == [us[1].study_uid]
    assert reroute("--dry-run").stdout.strip() == "every stored image is in the route that takes it"

    # The site then keeps unrouted images out of every model: the general model's images wait for one.
    none = reroute(DRH_UNROUTED="none")
    assert none.returncode == 0, none.stdout + none.stderr
    assert "2  OT     general -> (no model)" in none.stdout and "12  CT     general -> (no model)" in none.stdout
    assert all(store.records.instance(s.sop_uids[0])["state"] == "no-model" for s in ot)
    assert store.codes.count(general, "image") == 0 and gather(store)["no_model"] == {"OT": 2, "CT": 12}
    wait_until(lambda: store.codes.count(general, "study") == 0, 60, what="the general studies pooled again")
    assert store.codes.count(general, "series") == 0

    # Studies stored before series codes existed get theirs from `drh-pacs repool` (no model pass).
    for study in dx:
        (series_uid,) = {r["series_uid"] for r in store.records.instances(study.sop_uids)}
        store.codes.delete(chest.version, "series", series_uid)
    assert store.codes.count(chest.version, "series") == 0
    repool = subprocess.run(
        [sys.executable, "-m", "plugin.cli", "repool"], env=env, capture_output=True, text=True, timeout=120
    )
    assert repool.returncode == 0 and "9 study(ies) due for pooling" in repool.stdout, repool.stdout + repool.stderr
    wait_until(lambda: store.codes.count(chest.version, "series") == 4, 60, what="the chest series pooled again")


def test_registering_a_route_for_volumes_moves_whole_series_and_samples_them_again(
    redis_server, store, worker_factory, tmp_path
):
    from hashing.encoder import resolve_model_path

    # Head CT arrives before any CT model: the general model samples its series (4 of 12 slices).
    images = fixture_images()
    ct = make_study(tmp_path / "in", images[:12], patient_id="P1", modality="CT", body_part="HEAD")
    ct2 = make_study(tmp_path / "in", images[1:9], patient_id="P2", modality="CT", body_part="HEAD")
    sample = {"DRH_MAX_FRAMES_PER_SERIES": "4", "DRH_EXTRA_MODELS": ""}
    worker_factory("volumes-route", **sample)
    app = app_for(redis_server.url, tmp_path / "data")
    send(app, ct)
    send(app, ct2)
    general = None

    def pooled() -> bool:
        nonlocal general
        general = store.models.active("general")
        return bool(general) and all(store.codes.has(general, "study", s.study_uid) for s in (ct, ct2))

    wait_until(pooled, 120, what="the CT studies pooled by the general model")
    assert store.codes.count(general, "image") == 8

    # A site's CT model (here the general weights under another version) registered for CT + HEAD.
    ckpt = checkpoint.load(resolve_model_path("shipped:general"))
    ckpt["version"] = "ct-head-v1"
    checkpoint.save(ckpt, tmp_path / "ct.pt")
    env = worker_env(redis_server.url, tmp_path / "data", **sample)
    command = [sys.executable, "-m", "plugin.cli", "register", str(tmp_path / "ct.pt"), "--route", "ct-head"]
    done = subprocess.run(
        [*command, "--modality", "CT", "--body-part", "HEAD", "--wait"], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "complete, 20/20 instances" in done.stdout  # every slice moved, encoded or not
    records = store.records.instances(ct.sop_uids)
    assert {r["route"] for r in records} == {"ct-head"}
    sampled = [s for s, r in zip(ct.sop_uids, records, strict=True) if r["state"] == "indexed"]
    assert sampled == [ct.sop_uids[i] for i in evenly_spaced(12, 4)]  # sampled again, still 4
    assert store.codes.count("ct-head-v1", "image") == 8 and store.codes.count("ct-head-v1", "series") == 2
    assert store.codes.count(general, "image") == 0 and store.codes.count(general, "series") == 0
    others = [r for s, r in zip(ct.sop_uids, records, strict=True) if s not in sampled]
    assert all(r["state"] == "volume-slice" and r["represented_by"] in sampled for r in others)
    indexes = {level: RoutedIndex(store, level) for level in ("study", "series", "image")}
    series_uid = records[0]["series_uid"]
    answer = q.run_similar(q.SimilarQuery("SERIES", series_uid, 5), store, indexes)
    assert answer.route == "ct-head" and [r.study_uid for r in answer] == [ct2.study_uid]
    # a new CT study goes straight to the new route
    late = make_study(tmp_path / "late", images[:2], patient_id="P3", modality="CT", body_part="HEAD")
    send(app, late)
    wait_until(lambda: store.records.instance(late.sop_uids[0]).get("route") == "ct-head", 60, what="new CT study")
