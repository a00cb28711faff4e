"""The HTTP similar search, served by uvicorn on a free port and called over HTTP with httpx.

The archive is hashed with the real encoder (the shipped model, or its seeded fallback), so an
uploaded copy of an indexed image must come back at distance 0.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from pydicom.uid import generate_uid

from tests.helpers.dicomgen import fixture_images, make_instance, make_study
from tests.helpers.peers import make_settings
from tests.helpers.processes import wait_until

TOKEN = "test-token"


@pytest.fixture(scope="module")
def encoder():
    from hashing.encoder import Encoder

    return Encoder.load(None, device="cpu")


class Archive:
    """Three one-image studies and one two-image study, hashed and stored as the workers do."""

    def __init__(self, store, encoder, tmp: Path) -> None:
        from hashing.preprocess import load_pixels, read_dataset
        from workers.tasks import pool_one

        self.version, self.route = encoder.version, encoder.route.name
        store.models.register(encoder.version, encoder.nbits, rerank_dim=encoder.rerank_dim, route=encoder.route)
        store.models.ensure_active(encoder.version)
        images = fixture_images()
        plan = [
            ("P1", [images[0]], "DX"),
            ("P2", [images[4]], "DX"),
            ("P3", [images[8]], "CR"),
            ("P1", images[1:3], "DX"),
        ]
        self.studies = []
        self.series: list[str] = []
        self.vectors: dict[str, np.ndarray] = {}  # SOPInstanceUID -> its re-ranking vector
        for n, (pid, files, modality) in enumerate(plan):
            study = make_study(tmp / "archive", files, patient_id=pid, modality=modality, study_date=f"2024010{n + 1}")
            pixels = [load_pixels(read_dataset(f)) for f in study.files]
            codes, embeddings, reranks, variants = encoder.encode_images(pixels)
            series_uid = generate_uid()
            for path, sop, c, emb, rr, var in zip(
                study.files, study.sop_uids, codes, embeddings, reranks, variants, strict=True
            ):
                store.records.put_instance(
                    sop, study.study_uid, {"series_uid": series_uid, "modality": modality, "path": str(path)}
                )
                store.codes.upsert(encoder.version, "image", sop, bytes(c), study_uid=study.study_uid, rerank=rr)
                store.embeddings.put(encoder.version, sop, emb, var)
                self.vectors[sop] = rr
            store.records.put_study(
                study.study_uid,
                {
                    "patient_id": pid,
                    "patient_name": f"NAME^{pid}",
                    "study_date": f"2024010{n + 1}",
                    "modalities": modality,
                    "n_instances": str(len(files)),
                    "body_part": "CHEST",
                },
            )
            pool_one(store, encoder, encoder.version, study.study_uid, study.sop_uids, 0.0)  # study and series codes
            self.studies.append(study)
            self.series.append(series_uid)


@pytest.fixture
def api(tmp_path, redis_client, redis_server) -> Iterator[tuple[httpx.Client, object]]:
    import uvicorn

    from plugin.core.redis_server import free_port
    from plugin.http.app import ApiContext, create_app
    from plugin.search.routed import RoutedIndex
    from plugin.store import LEVELS, Store

    settings = make_settings(tmp_path, redis_server.url, http_port=free_port(), api_token=TOKEN)
    store = Store(redis.Redis.from_url(redis_server.url), settings.redis_namespace)
    ctx = ApiContext(settings=settings, store=store, index={lv: RoutedIndex(store, lv) for lv in LEVELS})
    server = uvicorn.Server(
        uvicorn.Config(create_app(ctx), host="127.0.0.1", port=settings.http_port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, what="uvicorn to start")
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{settings.http_port}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
    )
    try:
        yield client, store
    finally:
        client.close()
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def archive(api, encoder, tmp_path) -> Archive:
    return Archive(api[1], encoder, tmp_path)


def test_token_is_required(api):
    client, _ = api
    response = httpx.get(f"{client.base_url}/api/similar/study/1.2.3")
    assert response.status_code == 401
    response = httpx.get(f"{client.base_url}/api/similar/study/1.2.3", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


def test_index_not_ready_is_503(api):
    client, _ = api
    response = client.get("/api/similar/study/1.2.3")
    assert response.status_code == 503 and response.json()["error"] == "index-not-ready"


def test_similar_by_study_uid(api, archive):
    client, _ = api
    ref = archive.studies[0]
    body = client.get(f"/api/similar/study/{ref.study_uid}", params={"k": 10}).json()
    uids = [r["study"]["study_instance_uid"] for r in body["results"]]
    assert ref.study_uid not in uids
    assert sorted(uids) == sorted(s.study_uid for s in archive.studies[1:])
    # the Hamming shortlist re-ranked by the stored re-ranking vectors: scores fall, distances are carried
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in body["results"]] == [1, 2, 3]
    assert all(r["reranked"] and 0 <= r["score"] <= 1 and 0 <= r["distance"] <= body["nbits"] for r in body["results"])
    assert body["model_version"] == archive.version and body["level"] == "study"
    assert body["route"] == archive.route  # the route that answered: the reference's

    only_cr = client.get(f"/api/similar/study/{ref.study_uid}", params={"modality": "CR"}).json()
    assert [r["study"]["study_instance_uid"] for r in only_cr["results"]] == [archive.studies[2].study_uid]
    others = client.get(f"/api/similar/study/{ref.study_uid}", params={"exclude_same_patient": "yes"}).json()
    assert archive.studies[3].study_uid not in [r["study"]["study_instance_uid"] for r in others["results"]]
    one_patient = client.get(f"/api/similar/study/{ref.study_uid}", params={"patient_id": "P1"}).json()
    assert [r["study"]["study_instance_uid"] for r in one_patient["results"]] == [archive.studies[3].study_uid]


def test_similar_by_study_refusals(api, archive):
    client, store = api
    assert client.get("/api/similar/study/1.2.999").status_code == 404
    store.records.put_study("1.2.998", {"patient_id": "P9"})
    response = client.get("/api/similar/study/1.2.998")
    assert response.status_code == 409 and "not yet indexed" in response.json()["detail"]
    assert client.get(f"/api/similar/study/{archive.studies[0].study_uid}", params={"k": "0"}).status_code == 400
    assert client.get("/api/similar/study/not-a-uid").status_code == 400
    bad_date = client.get(f"/api/similar/study/{archive.studies[0].study_uid}", params={"date_from": "2024"})
    assert bad_date.status_code == 400
    # Refused, not read as "no filter" or as a number: an impossible day, a yes-or-no that is
    # neither, a misspelt filter.
    ref = archive.studies[0].study_uid
    for params, needle in (
        ({"date_from": "20201345"}, "not a date"),
        ({"date_to": "20190230"}, "not a date"),
        ({"exclude_same_patient": "maybe"}, "yes or no"),
        ({"modalities": "CT"}, "unknown parameter modalities"),
    ):
        refused = client.get(f"/api/similar/study/{ref}", params=params)
        assert refused.status_code == 400 and needle in refused.json()["detail"], params
    assert client.get(f"/api/similar/study/{ref}", params={"exclude_same_patient": "no"}).status_code == 200
    upload = client.post("/api/similar/upload", params={"level": "image", "colour": "red"}, content=b"x")
    assert upload.status_code == 400 and "unknown parameter colour" in upload.json()["detail"]


def test_similar_by_instance_uid(api, archive):
    client, _ = api
    ref = archive.studies[3].sop_uids[0]
    body = client.get(f"/api/similar/instance/{ref}", params={"k": 3}).json()
    assert body["level"] == "image" and len(body["results"]) == 3
    assert ref not in [r["sop_instance_uid"] for r in body["results"]]
    assert all(r["study"]["study_instance_uid"] for r in body["results"])


def test_answers_are_reranked_by_the_references_variants(api, archive, encoder):
    """A stored reference is re-ranked by its query variants (hashing.variants): an image by its own,
    a two-image study by its images' pooled; each answer's score is (1 + its best cosine) / 2."""
    from hashing.bits import pooled_variants, rerank_similarity

    client, store = api

    def best(variants, vector):
        return round((1 + float(rerank_similarity(variants, vector[None])[0])) / 2, 4)

    study = archive.studies[3]  # two images of patient P1
    stored = store.embeddings.variants_of(archive.version, study.sop_uids, encoder.rerank_dim)
    assert stored.shape == (2, 27, encoder.rerank_dim)
    ref = study.sop_uids[0]
    body = client.get(f"/api/similar/instance/{ref}", params={"k": 3}).json()
    assert body["reranking"] == {"by": "variants", "variants": 27, "shortlist": 1000}
    for r in body["results"]:
        assert r["score"] == pytest.approx(best(stored[0], archive.vectors[r["sop_instance_uid"]]), abs=2e-4)
    # an image indexed before its model stored variants: re-ranked by its own vector, and the answer says so
    other = archive.studies[0].sop_uids[0]
    store.embeddings.r.hdel(store.keys.variants(archive.version), other)
    body = client.get(f"/api/similar/instance/{other}", params={"k": 3}).json()
    assert body["reranking"] == {"by": "reference", "shortlist": 300}
    for r in body["results"]:
        plain = rerank_similarity(archive.vectors[other], archive.vectors[r["sop_instance_uid"]][None])[0]
        assert r["score"] == pytest.approx(round((1 + float(plain)) / 2, 4), abs=2e-4)
    body = client.get(f"/api/similar/study/{study.study_uid}", params={"k": 10}).json()
    pooled = pooled_variants(stored)
    snap = store.codes.snapshot(archive.version, "study")
    slots = store.codes.slots_of(archive.version, "study", [r["study"]["study_instance_uid"] for r in body["results"]])
    assert len(body["results"]) == 3
    for r, slot in zip(body["results"], slots, strict=True):
        assert r["score"] == pytest.approx(best(pooled, snap.rerank[slot]), abs=2e-4)


def test_similar_by_series_uid_answers_series_with_their_studies(api, archive, encoder):
    client, store = api
    ref = archive.series[3]  # the two-image study's series: its DMIH code pools both images
    body = client.get(f"/api/similar/series/{ref}", params={"k": 10}).json()
    assert (
        body["level"] == "series"
        and body["route"] == archive.route
        and body["reference"] == {"series_instance_uid": ref}
    )
    answered = [(r["series_instance_uid"], r["study"]["study_instance_uid"]) for r in body["results"]]
    assert sorted(answered) == sorted(zip(archive.series[:3], [s.study_uid for s in archive.studies[:3]], strict=True))
    # the stored series code is DMIH over the series' stored embeddings, the way a study code is
    embs = store.embeddings.get_many(archive.version, archive.studies[3].sop_uids)
    code, _ = encoder.encode_study(np.stack([embs[s] for s in sorted(embs)]).astype(np.float32))
    assert store.codes.get(archive.version, "series", ref) == bytes(code)
    only_cr = client.get(f"/api/similar/series/{ref}", params={"modality": "CR"}).json()
    assert [r["series_instance_uid"] for r in only_cr["results"]] == [archive.series[2]]
    unknown = client.get(f"/api/similar/series/{generate_uid()}")
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown-reference"


def test_upload_a_copy_of_an_indexed_image_finds_it_at_distance_zero(api, archive, tmp_path):
    client, _ = api
    target = archive.studies[1]
    copy = make_instance(fixture_images()[4], study_uid=generate_uid(), series_uid=generate_uid(), patient_id="PX")
    path = tmp_path / "upload.dcm"
    copy.save_as(path, enforce_file_format=True)

    image_level = client.post(
        "/api/similar/upload", params={"level": "image", "k": 2}, files={"file": ("x.dcm", path.read_bytes())}
    )
    assert image_level.status_code == 200, image_level.text
    first = image_level.json()["results"][0]
    assert first["sop_instance_uid"] == target.sop_uids[0] and first["distance"] == 0

    study_level = client.post(
        "/api/similar/upload", content=path.read_bytes(), headers={"Content-Type": "application/dicom"}
    )
    assert study_level.status_code == 200, study_level.text
    body = study_level.json()
    assert body["results"][0]["study"]["study_instance_uid"] == target.study_uid
    assert body["results"][0]["distance"] == 0
    assert body["reference"]["sop_instance_uid"] == copy.SOPInstanceUID


def test_upload_of_an_indexed_file_leaves_itself_out(api, archive):
    client, _ = api
    own = archive.studies[0]
    body = client.post("/api/similar/upload", files={"file": ("a.dcm", own.files[0].read_bytes())}).json()
    assert own.study_uid not in [r["study"]["study_instance_uid"] for r in body["results"]]


def test_upload_that_is_not_an_image(api, archive):
    client, _ = api
    response = client.post("/api/similar/upload", content=b"not dicom at all" * 10)
    assert response.status_code == 422
    assert client.post("/api/similar/upload", content=b"").status_code == 400
    assert client.post("/api/similar/upload", params={"level": "series"}, content=b"x").status_code == 400


def test_codes_of_the_archive_are_the_encoders(archive, encoder):
    """Guard for the tests above: equal pixels give equal codes with this encoder (deterministic)."""
    from hashing.preprocess import load_pixels, read_dataset

    f = archive.studies[1].files[0]
    a = encoder.encode_images([load_pixels(read_dataset(f))]).codes
    b = encoder.encode_images([load_pixels(read_dataset(f))]).codes
    assert np.array_equal(a, b)


def test_upload_answers_what_the_model_saw_and_can_leave_the_files_patient_out(api, archive, tmp_path):
    import base64
    import io

    from PIL import Image

    client, _ = api
    own = archive.studies[0]  # patient P1, who has another study in the archive
    body = client.post(
        "/api/similar/upload",
        params={"exclude_same_patient": "yes"},
        files={"file": ("a.dcm", own.files[0].read_bytes())},
    ).json()
    assert body["reference"]["patient_id"] == "P1"
    assert archive.studies[3].study_uid not in [r["study"]["study_instance_uid"] for r in body["results"]]
    header, _, data = body["reference"]["thumbnail"].partition(",")
    assert header == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).size == (192, 192)
    picture = io.BytesIO()
    Image.open(fixture_images()[0]).save(picture, format="PNG")
    refused = client.post(
        "/api/similar/upload", params={"exclude_same_patient": "yes"}, files={"file": ("a.png", picture.getvalue())}
    )
    assert refused.status_code == 400 and "PatientID" in refused.json()["detail"]
