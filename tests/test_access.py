"""Who may do what over DICOM, with the secure defaults: anyone (or the allow-list) stores, only the
viewers declared in ``dicom_viewers`` query and retrieve (C-FIND, C-MOVE, C-GET), and that one declaration is also the
viewer's C-MOVE address. Real DCMTK peers against the SCP of `drh-pacs serve`."""

from __future__ import annotations

import pytest

from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.peers import StoreSCP, code, dcmtk, findscu, populate, running_plugin
from tests.helpers.processes import wait_until

pytestmark = pytest.mark.slow  # real DICOM peers

REF = "1.2.826.0.1.3680043.8.498.200"
NEAR = "1.2.826.0.1.3680043.8.498.201"
STUDY_KEYS = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=", "PatientID=", "PatientName="]


def _archive(plugin) -> None:
    meta = {"patient_id": "P1", "patient_name": "NAME^P1", "study_date": "20240101", "modalities": "DX"}
    populate(plugin.store, {REF: (code("0" * 16), meta), NEAR: (code("0" * 15 + "1"), meta)})


def test_secure_defaults_store_from_anyone_and_answer_queries_to_nobody(tmp_path, redis_client, redis_server):
    study = make_study(tmp_path / "in", fixture_images("normal")[:1])
    with running_plugin(tmp_path, redis_server.url, dicom_query_open=False) as plugin:
        _archive(plugin)
        port = str(plugin.port)
        stored = dcmtk("storescu", "-aet", "ANYPACS", "-aec", "DRHPACS", "127.0.0.1", port, str(study.files[0]))
        assert stored.returncode == 0, stored.stderr
        assert dcmtk("echoscu", "-aet", "ANYONE", "-aec", "DRHPACS", "127.0.0.1", port).returncode == 0

        plain, answers = findscu(plugin.port, STUDY_KEYS, tmp_path / "a", calling="ANYONE")
        assert plain.returncode != 0 and answers == []
        assert "No Acceptable Presentation Contexts" in plain.stdout + plain.stderr
        similar, answers = findscu(
            plugin.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={REF}"], tmp_path / "b", called="SIMILAR"
        )
        assert similar.returncode != 0 and answers == []
        assert "Calling AE Title Not Recognized" in similar.stdout + similar.stderr
        moved = dcmtk("movescu", "-S", "-aet", "ANYONE", "-aec", "DRHPACS", "-aem", "ANYONE",
                      "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
                      "127.0.0.1", port)  # fmt: skip
        assert moved.returncode != 0 and "No Acceptable Presentation Contexts" in moved.stdout + moved.stderr
        (tmp_path / "get").mkdir()
        got = dcmtk("getscu", "-S", "-aet", "ANYONE", "-aec", "DRHPACS", "-od", str(tmp_path / "get"),
                    "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
                    "127.0.0.1", port)  # fmt: skip
        assert got.returncode != 0 and "No adequate Presentation Contexts for sending C-GET" in got.stderr
        assert not list((tmp_path / "get").iterdir())


def test_one_declaration_lets_a_viewer_query_and_receive_its_c_move(tmp_path, redis_client, redis_server):
    viewer = StoreSCP(tmp_path / "viewer")
    study = make_study(tmp_path / "in", fixture_images("viral")[:2])
    settings = {
        "dicom_query_open": False,
        "allowed_calling_aes": ["PACS"],  # storage locked to the PACS; the viewer needs no entry here
        "dicom_viewers": {"VIEWER": f"127.0.0.1:{viewer.port}"},
        "max_results": 5,
        "default_results": 3,
    }
    try:
        with running_plugin(tmp_path, redis_server.url, **settings) as plugin:
            _archive(plugin)
            port = str(plugin.port)
            stored = dcmtk("storescu", "-aet", "PACS", "-aec", "DRHPACS", "127.0.0.1", port, *map(str, study.files))
            assert stored.returncode == 0, stored.stderr
            refused = dcmtk("storescu", "-aet", "OTHER", "-aec", "DRHPACS", "127.0.0.1", port, str(study.files[0]))
            assert refused.returncode != 0

            proc, answers = findscu(plugin.port, STUDY_KEYS, tmp_path / "a", calling="VIEWER")
            assert proc.returncode == 0, proc.stderr
            assert {str(a.StudyInstanceUID) for a in answers} >= {REF, NEAR}
            proc, answers = findscu(
                plugin.port,
                ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={REF}", "PatientID="],
                tmp_path / "b",
                called="SIMILAR",
                calling="VIEWER",
            )
            assert proc.returncode == 0, proc.stderr
            assert [str(a.StudyInstanceUID) for a in answers] == [NEAR]

            # the same declaration is where its C-MOVE goes (no dicom_nodes entry)
            moved = dcmtk("movescu", "-S", "-aet", "VIEWER", "-aec", "DRHPACS", "-aem", "VIEWER",
                          "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
                          "127.0.0.1", port, timeout=120)  # fmt: skip
            assert moved.returncode == 0, moved.stdout + moved.stderr
            wait_until(lambda: viewer.received() == set(study.sop_uids), 30, what="the viewer to receive the study")
            # and it may pull with C-GET, on its own association
            (tmp_path / "get").mkdir()
            got = dcmtk("getscu", "-S", "-aet", "VIEWER", "-aec", "DRHPACS", "-od", str(tmp_path / "get"),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}",
                        "127.0.0.1", port, timeout=120)  # fmt: skip
            assert got.returncode == 0, got.stdout + got.stderr
            assert len([p for p in (tmp_path / "get").iterdir() if p.is_file()]) == len(study.files)

            # a maximum k per query: more is refused with the reason, not cut silently
            keys = ["QueryRetrieveLevel=STUDY", "(0099,0010)=DRH-PACS 1", f"(0099,1001)={REF}", "(0099,1002)=500"]
            proc, answers = findscu(plugin.port, keys, tmp_path / "c", calling="VIEWER", debug=True)
            assert answers == []
            assert "k=500 is over the maximum of 5" in proc.stdout + proc.stderr
    finally:
        viewer.stop()
