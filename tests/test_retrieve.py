"""The page's "send to" button (``POST /api/studies/{uid}/move``): forwarded as a C-MOVE to the real
Orthanc that sent the study, received by a DCMTK storescp; refusals for destinations the page may not
use and studies it does not know. (Sending from the spool is exercised by the browser test.)
"""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from plugin.core.redis_server import free_port
from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.peers import ORTHANC_USER, Orthanc, StoreSCP, make_settings
from tests.helpers.processes import wait_until

pytestmark = pytest.mark.slow  # Orthanc and storescp

TOKEN = "test-token"


def test_send_is_forwarded_to_the_pacs_that_holds_the_study(tmp_path, redis_server, store):
    from plugin.http.app import ApiContext, create_app

    study = make_study(tmp_path / "in", fixture_images()[0:2], patient_id="P-SEND")
    viewer = StoreSCP(tmp_path / "viewer", "VIEWER")
    try:
        with Orthanc(tmp_path, {"DRHPACS": free_port(), "VIEWER": viewer.port}, forward=False) as orthanc:
            for path in study.files:
                assert httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), auth=ORTHANC_USER).is_success
            store.records.put_study(study.study_uid, {"source_ae": "ORTHANC", "patient_id": "P-SEND"})
            settings = make_settings(
                tmp_path, redis_server.url, api_token=TOKEN, move_destinations=["VIEWER"],
                dicom_nodes={"ORTHANC": f"127.0.0.1:{orthanc.dicom_port}"},
                dicom_viewers={"VIEWER": f"127.0.0.1:{viewer.port}"},  # a viewer is declared once
            )  # fmt: skip
            client = TestClient(
                create_app(ApiContext(settings=settings, store=store)), headers={"Authorization": f"Bearer {TOKEN}"}
            )
            sent = client.post(f"/api/studies/{study.study_uid}/move", json={"destination": "VIEWER"})
            assert sent.status_code == 200, sent.text
            assert sent.json()["via"] == "pacs" and sent.json()["completed"] == 2 and sent.json()["failed"] == 0
            wait_until(lambda: viewer.received() == set(study.sop_uids), 30, what="the viewer to receive the study")

            elsewhere = client.post(f"/api/studies/{study.study_uid}/move", json={"destination": "ORTHANC"})
            assert elsewhere.status_code == 403  # a known node, but not one the page may send to
            unknown = client.post("/api/studies/1.2.826.0.1.3680043.8.498.4242/move", json={"destination": "VIEWER"})
            assert unknown.status_code == 404 and "nothing to send" in unknown.json()["error"]
            assert client.post(f"/api/studies/{study.study_uid}/move", content=b"VIEWER").status_code == 400
            missing = client.post(f"/api/studies/{study.study_uid}/move", json={})  # was 403 "'' is not one of..."
            assert missing.status_code == 400 and "destination" in missing.json()["error"]
    finally:
        viewer.stop()


def test_a_send_from_the_spool_says_what_a_destination_did_not_take(tmp_path, redis_server, monkeypatch):
    """A destination that takes no context for some images, or drops the association midway: counted
    and said, not an HTTP 500 that loses the counts."""
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    from plugin.dicom.move import Node
    from plugin.http import retrieve
    from plugin.http.retrieve import SendError, _store_files

    # pynetdicom sometimes notices an abort only when the awaited answer times out: a short wait here
    monkeypatch.setattr(retrieve, "SEND_DIMSE_TIMEOUT", 5)

    study = make_study(tmp_path / "in", fixture_images()[0:2], patient_id="P-DROP")
    other = make_study(tmp_path / "ot", fixture_images()[2:3], patient_id="P-DROP", study_uid=study.study_uid,
                       modality="OT")  # fmt: skip
    files = study.files + other.files
    settings = make_settings(tmp_path, redis_server.url)
    dx_only = AE("DXONLY")
    dx_only.add_supported_context(DigitalXRayImageStorageForPresentation)
    received: list[str] = []

    def drop_the_second(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        if len(received) == 2:
            event.assoc.abort()  # the viewer crashes while storing it, before answering
        return 0x0000

    dropping = AE("DROPS")
    dropping.supported_contexts = StoragePresentationContexts
    ports = free_port(), free_port()
    servers = [
        dx_only.start_server(("127.0.0.1", ports[0]), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)]),
        dropping.start_server(("127.0.0.1", ports[1]), block=False, evt_handlers=[(evt.EVT_C_STORE, drop_the_second)]),
    ]
    try:
        counts = _store_files(settings, Node("DXONLY", "127.0.0.1", ports[0]), files, study.study_uid)
        assert counts == {"completed": 2, "failed": 1, "warning": 0}  # the OT image has no context there
        with pytest.raises(SendError, match="DROPS dropped the association: 1 of 3 image\\(s\\) sent") as err:
            _store_files(settings, Node("DROPS", "127.0.0.1", ports[1]), files, study.study_uid)
        assert err.value.status == 502
    finally:
        for server in servers:
            server.shutdown()
