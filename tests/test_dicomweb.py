"""DICOMweb: the similar QIDO-RS root, the plain root and WADO-RS renderings, exercised with the real
``dicomweb-client`` from PyPI against the HTTP API served by uvicorn over a real Redis.

The archive is generated, put in the spool and indexed by the workers' own writers with the shipped
encoder (:mod:`tests.helpers.archive`), so rankings are the model's, not a fixture's.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image

from tests.helpers.archive import Planned, index_archive
from tests.helpers.dicomgen import fixture_images
from tests.helpers.peers import make_settings
from tests.helpers.processes import wait_until

TOKEN = "test-token"
WADO = "https://pacs.example.org/dicom-web"
CREATOR, RANK, DISTANCE, SCORE, MODEL = "00990010", "00991004", "00991005", "00991006", "00991008"


@pytest.fixture(scope="module")
def encoder():
    from hashing.encoder import Encoder

    return Encoder.load(None, device="cpu")


class Service:
    def __init__(self, base: str, store, settings) -> None:
        self.base = base
        self.store = store
        self.settings = settings
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)

    def client(self, root: str = "/dicom-web/similar") -> DICOMwebClient:
        return DICOMwebClient(url=self.base + root, headers={"Authorization": f"Bearer {TOKEN}"})


NAMESPACE = "drh-dicomweb-test"


@pytest.fixture(scope="module")
def service(tmp_path_factory, redis_server) -> Iterator[Service]:
    """The API over uvicorn, once for the module, in a namespace of its own (tests that change the
    store add records of their own; none changes the archive's)."""
    import uvicorn

    from plugin.core.redis_server import free_port
    from plugin.http.app import ApiContext, create_app
    from plugin.search.routed import RoutedIndex
    from plugin.store import Store

    client = redis.Redis.from_url(redis_server.url)
    for key in client.scan_iter(match=f"{NAMESPACE}:*"):
        client.delete(key)
    settings = make_settings(
        tmp_path_factory.mktemp("dicomweb"), redis_server.url, http_port=free_port(), api_token=TOKEN,
        pacs_wado_root=WADO, cors_origins=["https://ohif.example.org"], redis_namespace=NAMESPACE,
    )  # fmt: skip
    store = Store(client, settings.redis_namespace)
    ctx = ApiContext(settings=settings, store=store, index={lv: RoutedIndex(store, lv) for lv in ("study", "image")})
    server = uvicorn.Server(
        uvicorn.Config(create_app(ctx), host="127.0.0.1", port=settings.http_port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 15, what="uvicorn to start")
    svc = Service(f"http://127.0.0.1:{settings.http_port}", store, settings)
    try:
        yield svc
    finally:
        svc.http.close()
        server.should_exit = True
        thread.join(10)


PLAN = [
    Planned("P1", [fixture_images()[0]], "DX", "20240101"),
    Planned("P2", [fixture_images()[4]], "DX", "20240102"),
    Planned("P3", [fixture_images()[8]], "CR", "20240103"),
    Planned("P1", fixture_images()[1:3], "DX", "20240104"),
    Planned("P4", [fixture_images()[5]], "DX", "20240105"),
]


@pytest.fixture(scope="module")
def archive(service, encoder):
    return index_archive(service.store, encoder, service.settings.spool_dir, PLAN)


def _uids(answers: list[dict]) -> list[str]:
    return [a["0020000D"]["Value"][0] for a in answers]


def _value(answer: dict, tag: str):
    return answer[tag]["Value"][0]


def _status(excinfo: pytest.ExceptionInfo) -> int:
    return excinfo.value.response.status_code


def test_similar_studies_nearest_first_with_the_private_block(service, archive, encoder):
    ref = archive[0]
    answers = service.client().search_for_studies(search_filters={"StudyInstanceUID": ref.study_uid})
    assert sorted(_uids(answers)) == sorted(s.study_uid for s in archive[1:])  # all but the reference
    assert [int(_value(a, RANK)) for a in answers] == [1, 2, 3, 4]
    assert all(_value(a, CREATOR) == "DRH-PACS 1" and _value(a, MODEL) == encoder.version for a in answers)
    scores = [float(_value(a, SCORE)) for a in answers]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert all(0 <= int(_value(a, DISTANCE)) <= encoder.nbits for a in answers)
    # the same ranking as the JSON API (one query behind both)
    body = service.http.get(f"/api/similar/study/{ref.study_uid}").json()
    assert _uids(answers) == [r["study"]["study_instance_uid"] for r in body["results"]]
    first = answers[0]
    uid = _value(first, "0020000D")
    assert _value(first, "00081190") == f"{WADO}/studies/{uid}"  # RetrieveURL to the PACS
    record = service.store.records.study(uid)
    assert _value(first, "00100020") == record["patient_id"] and _value(first, "00080020") == record["study_date"]
    assert first["00080061"]["Value"] == [record["modalities"]]
    assert "00100010" in first and "00080050" in first and "00201208" in first


def test_reference_by_accession_number_and_patient(service, archive):
    ref = archive[0]
    accession = service.store.records.study(ref.study_uid)["accession_number"]
    by_uid = service.client().search_for_studies(search_filters={"StudyInstanceUID": ref.study_uid})
    by_accession = service.client().search_for_studies(search_filters={"AccessionNumber": accession})
    assert _uids(by_accession) == _uids(by_uid)
    # another patient's study (another issuer's) with the same number: ambiguous until PatientID says
    other = "1.2.826.0.1.3680043.8.498.777"
    service.store.records.put_study(other, {"accession_number": accession, "patient_id": "P-OTHER"})
    try:
        with pytest.raises(requests.HTTPError) as excinfo:
            service.client().search_for_studies(search_filters={"AccessionNumber": accession})
        assert _status(excinfo) == 409
        named = service.client().search_for_studies(search_filters={"AccessionNumber": accession, "PatientID": "P1"})
        # PatientID named the reference's patient here, it did not filter: other patients are answered
        assert _uids(named) == _uids(by_uid)
    finally:
        service.store.records.delete_study(other, [])


def test_qido_matching_parameters_filter(service, archive):
    ref = archive[0].study_uid
    client = service.client()
    only_cr = client.search_for_studies(search_filters={"StudyInstanceUID": ref, "ModalitiesInStudy": "CR"})
    assert _uids(only_cr) == [archive[2].study_uid]
    by_tag = client.search_for_studies(search_filters={"StudyInstanceUID": ref, "00080061": "CR"})
    assert _uids(by_tag) == [archive[2].study_uid]
    dated = client.search_for_studies(search_filters={"StudyInstanceUID": ref, "StudyDate": "20240102-20240103"})
    assert sorted(_uids(dated)) == sorted([archive[1].study_uid, archive[2].study_uid])
    priors = client.search_for_studies(search_filters={"StudyInstanceUID": ref, "PatientID": "P1"})
    assert _uids(priors) == [archive[3].study_uid]
    others = client.search_for_studies(search_filters={"StudyInstanceUID": ref, "DRHExcludeReferencePatient": "YES"})
    assert archive[3].study_uid not in _uids(others) and len(others) == 3


def test_limit_offset_and_remaining(service, archive):
    ref = archive[0].study_uid
    client = service.client()
    everything = _uids(client.search_for_studies(search_filters={"StudyInstanceUID": ref}))
    assert _uids(client.search_for_studies(search_filters={"StudyInstanceUID": ref}, limit=2)) == everything[:2]
    page = client.search_for_studies(search_filters={"StudyInstanceUID": ref}, limit=2, offset=2)
    assert _uids(page) == everything[2:4] and [int(_value(a, RANK)) for a in page] == [3, 4]
    paged = client.search_for_studies(search_filters={"StudyInstanceUID": ref}, limit=1, get_remaining=True)
    assert _uids(paged) == everything


def test_the_ranking_is_at_most_max_results_deep(service, archive):
    """Settings.max_results bounds DICOMweb too: a larger limit answers fewer (QIDO lets a server),
    and a per-reference root matches only within that depth."""
    from starlette.testclient import TestClient

    from plugin.http.app import ApiContext, create_app
    from plugin.search.routed import RoutedIndex

    ref = archive[0].study_uid
    ranked = _uids(service.client().search_for_studies(search_filters={"StudyInstanceUID": ref}))
    settings = service.settings.replace(max_results=2)
    index = {lv: RoutedIndex(service.store, lv) for lv in ("study", "image")}
    client = TestClient(
        create_app(ApiContext(settings=settings, store=service.store, index=index)),
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json"},
    )
    answers = client.get("/dicom-web/similar/studies", params={"StudyInstanceUID": ref, "limit": "101"})
    assert answers.status_code == 200 and _uids(answers.json()) == ranked[:2]
    root = f"/dicom-web/similar/study/{ref}/studies"
    assert _uids(client.get(root, params={"StudyInstanceUID": ranked[1]}).json()) == [ranked[1]]
    assert client.get(root, params={"StudyInstanceUID": ranked[2]}).json() == []  # third: beyond the depth


def test_per_reference_roots_list_the_ranking_and_match_in_it(service, archive):
    ref = archive[0]
    ranked = _uids(service.client().search_for_studies(search_filters={"StudyInstanceUID": ref.study_uid}))
    root = service.client(f"/dicom-web/similar/study/{ref.study_uid}")
    assert _uids(root.search_for_studies()) == ranked  # the root's collection is the ranking
    # a key matches in that list: a viewer opening a listed study finds that study, with its rank
    (third,) = root.search_for_studies(search_filters={"StudyInstanceUID": ranked[2]})
    assert _uids([third]) == [ranked[2]] and int(_value(third, RANK)) == 3
    assert root.search_for_studies(search_filters={"StudyInstanceUID": ref.study_uid}) == []  # never the reference
    assert _uids(root.search_for_studies(search_filters={"PatientID": "P1"})) == [archive[3].study_uid]
    accession = service.store.records.study(ref.study_uid)["accession_number"]
    by_accession = service.client(f"/dicom-web/similar/accession/{accession}")
    assert _uids(by_accession.search_for_studies()) == ranked
    named = service.client(f"/dicom-web/similar/accession/{accession}/patient/P1")
    assert _uids(named.search_for_studies()) == ranked
    (series,) = root.search_for_series(study_instance_uid=archive[3].study_uid)  # browsing works under it
    assert _value(series, "00201209") == 2
    image = archive[3].sop_uids[0]
    images = service.client(f"/dicom-web/similar/instance/{image}").search_for_instances(limit=3)
    assert len(images) == 3 and image not in [_value(i, "00080018") for i in images]
    for unknown in ("/dicom-web/similar/study/1.2.999", "/dicom-web/similar/accession/NO-SUCH"):
        with pytest.raises(requests.HTTPError) as excinfo:
            service.client(unknown).search_for_studies()
        assert _status(excinfo) == 404, unknown


def test_the_requests_ohif_sends(service, archive):
    """Exactly the parameters OHIF's DICOMweb data source writes (extensions/default/.../qido.js:
    mapParams with supportsWildcard and supportsFuzzyMatching off), on the roots
    deploy/viewers/ohif/app-config.js gives it."""
    ref = archive[0]
    ohif = {
        "limit": "101",
        "offset": "0",
        "fuzzymatching": "false",
        "includefield": "00081030,00080060,00080090,00100030",
    }
    worklist = service.http.get(f"/dicom-web/similar/study/{ref.study_uid}/studies", params=ohif)
    assert worklist.status_code == 200 and len(worklist.json()) == 4
    assert all("00081030" in a for a in worklist.json())  # includefield answered
    opened = archive[3].study_uid
    for root in (f"/dicom-web/similar/study/{ref.study_uid}", ""):  # the similar data source, then the plain one
        current = service.http.get(f"/dicom-web{root.removeprefix('/dicom-web')}/studies",
                                   params={**ohif, "StudyInstanceUID": opened})  # fmt: skip
        assert current.status_code == 200 and _uids(current.json()) == [opened], root
    priors = service.http.get(f"/dicom-web/similar/study/{ref.study_uid}/studies", params={**ohif, "00100020": "P1"})
    assert _uids(priors.json()) == [opened]
    by_accession = service.http.get(
        "/dicom-web/similar/studies",
        params={**ohif, "AccessionNumber": service.store.records.study(ref.study_uid)["accession_number"]},
    )
    assert by_accession.status_code == 200 and len(by_accession.json()) == 4
    series = service.http.get(f"/dicom-web/studies/{opened}/series", params={"includefield": "0008103E,00080021"})
    assert series.status_code == 200 and len(series.json()) == 1


def test_refusals_are_http_errors_with_reasons(service, archive):
    client = service.client()
    for filters, status in [
        ({"StudyInstanceUID": "1.2.999"}, 404),  # unknown reference
        ({"StudyInstanceUID": "not-a-uid"}, 400),
        ({}, 400),  # no reference
        ({"StudyInstanceUID": archive[0].study_uid, "PatientName": "DOE*"}, 400),  # cannot match names
        ({"StudyInstanceUID": archive[0].study_uid, "StudyDate": "2024"}, 400),
        ({"AccessionNumber": "NO-SUCH-NUMBER"}, 404),
    ]:
        with pytest.raises(requests.HTTPError) as excinfo:
            client.search_for_studies(search_filters=filters)
        assert _status(excinfo) == status, filters
    service.store.records.put_study("1.2.998", {"patient_id": "P9"})
    with pytest.raises(requests.HTTPError) as excinfo:
        client.search_for_studies(search_filters={"StudyInstanceUID": "1.2.998"})
    assert _status(excinfo) == 409 and "not yet indexed" in excinfo.value.response.json()["detail"]
    response = service.http.get("/dicom-web/similar/studies", params={"StudyInstanceUID": "1.2.999"})
    assert response.json()["error"] == "unknown-reference"
    fuzzy = service.http.get(
        "/dicom-web/similar/studies", params={"StudyInstanceUID": archive[0].study_uid, "fuzzymatching": "true"}
    )
    assert fuzzy.status_code == 200 and "fuzzymatching parameter is not supported" in fuzzy.headers["warning"]
    xml = service.http.get(
        "/dicom-web/similar/studies",
        params={"StudyInstanceUID": archive[0].study_uid},
        headers={"Accept": "multipart/related; type=application/dicom+xml"},
    )
    assert xml.status_code == 406


def _own_store(redis_server, namespace: str):
    """A Store on a namespace of its own, emptied: not the ``store`` fixture, whose FLUSHALL would
    empty the module's service too."""
    from plugin.store import Store

    client = redis.Redis.from_url(redis_server.url)
    for key in client.scan_iter(match=f"{namespace}:*"):
        client.delete(key)
    return Store(client, namespace)


def test_index_not_ready_is_503_with_retry_after(tmp_path, redis_server):
    from starlette.testclient import TestClient

    from plugin.http.app import ApiContext, create_app
    from plugin.search.routed import RoutedIndex

    store = _own_store(redis_server, "drh-empty-test")  # no model yet: the index cannot load
    settings = make_settings(tmp_path, redis_server.url, api_token=TOKEN)
    indexes = {lv: RoutedIndex(store, lv) for lv in ("study", "image")}
    client = TestClient(create_app(ApiContext(settings=settings, store=store, index=indexes)))
    response = client.get(
        "/dicom-web/similar/studies", params={"StudyInstanceUID": "1.2.3"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 503 and response.headers["retry-after"]


def test_similar_instances(service, archive):
    ref = archive[3].sop_uids[0]
    answers = service.client().search_for_instances(search_filters={"SOPInstanceUID": ref}, limit=3)
    sops = [_value(a, "00080018") for a in answers]
    assert len(sops) == 3 and ref not in sops
    first = answers[0]
    series, study = _value(first, "0020000E"), _value(first, "0020000D")
    assert _value(first, "00081190") == f"{WADO}/studies/{study}/series/{series}/instances/{sops[0]}"
    assert _value(first, "00080016") and int(_value(first, RANK)) == 1


def test_browsing_a_returned_study_and_the_plain_root(service, archive):
    study = archive[3]
    for root in ("/dicom-web/similar", "/dicom-web"):
        client = service.client(root)
        (series,) = client.search_for_series(study_instance_uid=study.study_uid)
        assert _value(series, "00201209") == 2 and _value(series, "00080060") == "DX"
        series_uid = _value(series, "0020000E")
        instances = client.search_for_instances(study_instance_uid=study.study_uid, series_instance_uid=series_uid)
        assert [_value(i, "00080018") for i in instances] == study.sop_uids  # in instance-number order
    plain = service.client("/dicom-web")
    (found,) = plain.search_for_studies(search_filters={"StudyInstanceUID": study.study_uid})
    assert _value(found, "00100020") == "P1" and CREATOR not in found  # the study itself, no ranking
    accession = service.store.records.study(study.study_uid)["accession_number"]
    assert _uids(plain.search_for_studies(search_filters={"AccessionNumber": accession})) == [study.study_uid]
    with pytest.raises(requests.HTTPError) as excinfo:
        plain.search_for_studies(search_filters={"PatientID": "P1"})
    assert _status(excinfo) == 400
    with pytest.raises(requests.HTTPError) as excinfo:
        plain.search_for_series(study_instance_uid="1.2.999")
    assert _status(excinfo) == 404


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def test_thumbnails_and_rendered_frames_are_the_models_pixels(service, archive):
    from hashing.preprocess import load_file
    from hashing.resize import model_input

    study = archive[1]
    sop, path = study.sop_uids[0], study.files[0]
    series = service.store.records.instance(sop)["series_uid"]
    base = f"/dicom-web/studies/{study.study_uid}/series/{series}/instances/{sop}"
    png = service.http.get(base + "/thumbnail", headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-drh-rendered-from"] == "spool"
    # the thumbnail is the model's input drawn at 192 px: the same display chain, pixel for pixel
    assert np.array_equal(_decoded(png.content), model_input(load_file(path), 192))
    again = service.http.get(base + "/thumbnail", headers={"Accept": "image/png"})
    assert again.headers["x-drh-rendered-from"] == "cache" and again.content == png.content
    jpeg = service.client("/dicom-web").retrieve_instance_rendered(
        study.study_uid, series, sop, media_types=("image/jpeg",)
    )
    image = load_file(path)
    assert _decoded(jpeg).shape == image.shape
    # JPEG is lossy: close to the display chain's grey levels, not equal
    assert np.abs(_decoded(jpeg).astype(float) - np.round(image * 255)).mean() < 3
    small = service.http.get(base + "/frames/1/rendered", params={"viewport": "100,100"})
    assert max(_decoded(small.content).shape) == 100
    study_thumb = service.http.get(f"/dicom-web/similar/studies/{study.study_uid}/thumbnail")
    assert study_thumb.status_code == 200 and _decoded(study_thumb.content).shape == (192, 192)
    assert service.http.get(base + "/thumbnail", headers={"Accept": "image/gif"}).status_code == 406
    assert service.http.get(base + "/frames/2/rendered").status_code == 404  # a one-frame image
    gone = f"/dicom-web/studies/{study.study_uid}/series/{series}/instances/1.2.3.4/thumbnail"
    response = service.http.get(gone)
    assert response.status_code == 404 and "no PACS configured" in response.json()["error"]


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"ModalitiesInStudy": "cr,DX"}, {"modalities": ("CR", "DX")}),
        ({"ModalitiesInStudy": "CT\\MR"}, {"modalities": ("CT", "MR")}),
        ({"Modality": "US"}, {"modalities": ("US",)}),
        ({"StudyDate": "20240101-"}, {"date_from": "20240101", "date_to": None}),
        ({"StudyDate": "-20240131"}, {"date_from": None, "date_to": "20240131"}),
        ({"BodyPartExamined": "chest", "PatientID": "P1"}, {"body_part": "CHEST", "patient_id": "P1"}),
        ({"PatientID": "*", "ModalitiesInStudy": "*", "StudyDate": ""}, {"patient_id": None, "modalities": ()}),
        ({"DRHExcludeReferencePatient": "yes"}, {"exclude_reference_patient": True}),
    ],
)
def test_qido_matching_parameters_parse_into_the_one_filter_type(params, expected):
    from plugin.search.filters import qido_filters

    filters = qido_filters(params)
    assert {k: getattr(filters, k) for k in expected} == expected


@pytest.mark.parametrize(
    "params",
    [
        {"ModalitiesInStudy": "C*"},
        {"PatientID": "P*"},
        {"PatientID": "P1,P2"},
        {"BodyPartExamined": "CHEST\\ABDOMEN"},
        {"StudyDate": "2024-01-01"},
        {"StudyDate": "20241301"},
        {"StudyDate": "20240101-20240230"},
        {"DRHExcludeReferencePatient": "maybe"},
    ],
)
def test_qido_values_we_cannot_match_are_refused(params):
    from plugin.search.errors import QueryError
    from plugin.search.filters import qido_filters

    with pytest.raises(QueryError) as excinfo:
        qido_filters(params)
    assert excinfo.value.reason == "malformed"


def test_includefield_adds_attributes_but_never_bulk_data():
    from plugin.http.dicomweb import _include

    asked = {"includefield": "00081030,PixelData,all,Rows,NotAKeyword,RetrieveURL,7FE00010"}
    assert _include(asked) == ("StudyDescription", "Rows")


def test_a_thumbnail_cache_stays_within_its_limit(tmp_path):
    from plugin.http.rendered import DiskCache

    cache = DiskCache(tmp_path / "cache", limit=10_000)
    for n in range(30):
        cache.put(f"{n:064x}", bytes(1000))
    held = sum(p.stat().st_size for p in (tmp_path / "cache").glob("??/*"))
    assert held <= 10_000
    assert cache.get(f"{29:064x}") == bytes(1000)  # the newest stay
    assert cache.get(f"{0:064x}") is None  # the oldest went first


def test_dicomweb_wants_a_credential_and_cors_lets_allowed_origins_in(service, archive):
    plain = httpx.get(f"{service.base}/dicom-web/similar/studies", params={"StudyInstanceUID": archive[0].study_uid})
    assert plain.status_code == 401 and plain.headers["www-authenticate"].startswith("Bearer")
    preflight = httpx.options(
        f"{service.base}/dicom-web/similar/studies",
        headers={
            "Origin": "https://ohif.example.org",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://ohif.example.org"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    refused = httpx.options(
        f"{service.base}/dicom-web/similar/studies",
        headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "GET"},
    )
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers  # refused, not 401
    answer = service.http.get(
        "/dicom-web/similar/studies",
        params={"StudyInstanceUID": archive[0].study_uid},
        headers={"Origin": "https://ohif.example.org"},
    )
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://ohif.example.org"


def test_session_cookie_opens_dicomweb(service, archive):
    with httpx.Client(base_url=service.base) as browser:
        assert browser.post("/login", data={"password": "wrong"}).status_code == 401
        login = browser.post("/login", data={"password": TOKEN, "next": "/similar"})
        assert login.status_code == 303 and login.headers["location"] == "/similar"
        cookie = login.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie
        found = browser.get("/dicom-web/similar/studies", params={"StudyInstanceUID": archive[0].study_uid})
        assert found.status_code == 200 and len(found.json()) == 4


def test_spool_path_outside_the_spool_is_never_read(service, archive, tmp_path: Path):
    """A record that points outside the spool (tampered, or a stale path) is not served from there."""
    outside = tmp_path / "secret.dcm"
    outside.write_bytes(archive[1].files[0].read_bytes())
    sop = "1.2.826.0.1.3680043.8.498.999"
    service.store.records.put_instance(sop, archive[1].study_uid, {"path": str(outside), "series_uid": "1.2.3"})
    response = service.http.get(f"/dicom-web/studies/{archive[1].study_uid}/series/1.2.3/instances/{sop}/thumbnail")
    assert response.status_code == 404


@pytest.mark.slow
def test_instances_not_held_here_are_drawn_from_the_pacs(tmp_path, redis_server):
    """A real Orthanc holds an image drh-pacs never received: its thumbnail comes from Orthanc's REST API,
    drawn by our display chain; an Orthanc that does not answer is a 502, not an empty image."""
    from starlette.testclient import TestClient

    from hashing.preprocess import load_file
    from hashing.resize import model_input
    from plugin.core.redis_server import free_port
    from plugin.http.app import ApiContext, create_app
    from tests.helpers.dicomgen import make_study
    from tests.helpers.peers import ORTHANC_USER, Orthanc

    store = _own_store(redis_server, "drh-pacs-only-test")
    study = make_study(tmp_path / "pacs-only", [fixture_images()[6]], patient_id="P9")
    with Orthanc(tmp_path, {}, forward=False) as orthanc:
        upload = httpx.post(f"{orthanc.url}/instances", content=study.files[0].read_bytes(), auth=ORTHANC_USER)
        assert upload.status_code == 200, upload.text
        series_uid = orthanc.get(f"/instances/{upload.json()['ID']}/tags?simplify")["SeriesInstanceUID"]
        path = f"/dicom-web/studies/{study.study_uid}/series/{series_uid}/instances/{study.sop_uids[0]}/thumbnail"
        settings = make_settings(
            tmp_path, redis_server.url, api_token=TOKEN, orthanc_url=orthanc.url,
            orthanc_user=ORTHANC_USER[0], orthanc_password=ORTHANC_USER[1],
        )  # fmt: skip
        client = TestClient(create_app(ApiContext(settings=settings, store=store)))
        response = client.get(path, headers={"Authorization": f"Bearer {TOKEN}", "Accept": "image/png"})
        assert response.status_code == 200, response.text
        assert response.headers["x-drh-rendered-from"] == "pacs"
        assert np.array_equal(_decoded(response.content), model_input(load_file(study.files[0]), 192))
        missing = path.replace(study.sop_uids[0], "1.2.3.4.5")
        assert client.get(missing, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    down = make_settings(tmp_path, redis_server.url, api_token=TOKEN, orthanc_url=f"http://127.0.0.1:{free_port()}")
    client = TestClient(create_app(ApiContext(settings=down, store=store)))
    other = path.replace("/thumbnail", "/rendered")  # not in the cache
    response = client.get(other, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 502 and "PACS did not answer" in response.json()["error"]
