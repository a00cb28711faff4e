"""C-MOVE from a viewer (DCMTK movescu) through drh-pacs, into a viewer (DCMTK storescp).

Forwarded: the study came from Orthanc, so drh-pacs asks Orthanc to move it to the viewer (the
spooled copies are deleted first, so only Orthanc can have sent it). From the spool: a study from a
sender that is not a known node is sent by drh-pacs itself.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import pytest

from plugin.core.redis_server import free_port
from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.peers import Orthanc, StoreSCP, dcmtk, running_plugin
from tests.helpers.processes import wait_until

pytestmark = pytest.mark.slow  # real DICOM peers, Orthanc, workers or deployment tools


@pytest.fixture
def viewer(tmp_path) -> Iterator[StoreSCP]:
    v = StoreSCP(tmp_path / "viewer")
    yield v
    v.stop()


def movescu(port: int, study_uid: str, destination: str = "VIEWER") -> subprocess.CompletedProcess[str]:
    return dcmtk(
        "movescu", "-d", "-S", "-aet", "VIEWER", "-aec", "DRHPACS", "-aem", destination,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}",
        "127.0.0.1", str(port), timeout=120,
    )  # fmt: skip


def _held_by_orthanc_only(plugin, orthanc: Orthanc, study) -> None:
    """Store ``study`` into Orthanc, wait for its forwarder to bring it here, then delete the spooled
    copies: as after indexing with keep_files off, the metadata says where it came from, and only
    Orthanc can send it."""
    proc = dcmtk("storescu", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port), *map(str, study.files))
    assert proc.returncode == 0, proc.stderr
    folder = plugin.settings.spool_dir / study.study_uid
    n = len(study.files)
    wait_until(lambda: len(list(folder.glob("*.dcm"))) == n, 60, what="Orthanc to forward the study")
    plugin.store.records.put_study(study.study_uid, {"source_ae": "ORTHANC", "patient_id": study.patient_id})
    for path in folder.glob("*.dcm"):
        path.unlink()


def test_move_is_forwarded_to_the_pacs_that_sent_the_study(tmp_path, redis_client, redis_server, viewer, caplog):
    """A forward to a destination the PACS does not know fails at the PACS (Orthanc: "Unknown modality"):
    drh-pacs says so at WARNING with what to declare, and counts it."""
    import logging

    study = make_study(tmp_path / "in", fixture_images()[0:2], patient_id="P-MOVE")
    orthanc_port = free_port()
    other = StoreSCP(tmp_path / "other", ae="OTHER")  # known to drh-pacs, not declared in Orthanc
    nodes = {
        "ORTHANC": f"127.0.0.1:{orthanc_port}",
        "VIEWER": f"127.0.0.1:{viewer.port}",
        "OTHER": f"127.0.0.1:{other.port}",
    }
    with running_plugin(tmp_path, redis_server.url, dicom_nodes=nodes) as plugin, other_stopped(other):
        modalities = {"DRHPACS": plugin.port, "VIEWER": viewer.port}
        with Orthanc(tmp_path, modalities, dicom_port=orthanc_port) as orthanc:
            _held_by_orthanc_only(plugin, orthanc, study)

            proc = movescu(plugin.port, study.study_uid)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "Success" in proc.stdout + proc.stderr
            wait_until(lambda: viewer.received() == set(study.sop_uids), 30, what="the viewer to receive the study")
            assert "DRHPACS" in orthanc.log()  # Orthanc served a C-MOVE asked by drh-pacs
            forwards = {"success": 1, "refused": 0, "unreachable": 0, "cancelled": 0}
            assert plugin.server.counters.snapshot()["move_forwards"] == forwards

            with caplog.at_level(logging.INFO, logger="drh"):
                unknown = movescu(plugin.port, study.study_uid, destination="OTHER")
            assert unknown.returncode != 0 and "Unable to process" in unknown.stdout + unknown.stderr
            assert plugin.server.counters.snapshot()["move_forwards"] == {**forwards, "refused": 1}
            (line,) = [r for r in caplog.records if "FAILED" in r.getMessage()]
            assert line.levelno == logging.WARNING
            assert "is OTHER declared in ORTHANC's DICOM modalities" in line.getMessage()
            # the viewer is told why (ErrorComment), with no traceback in drh-pacs's log
            assert "the source PACS ORTHANC answered" in unknown.stdout + unknown.stderr
            assert not [r for r in caplog.records if r.exc_info]

            # a destination the PACS knows, but down: the warning says so, not "declare it"
            viewer.stop()
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="drh"):
                down = movescu(plugin.port, study.study_uid)
            assert down.returncode != 0
            (line,) = [r for r in caplog.records if "FAILED" in r.getMessage()]
            assert f"VIEWER at 127.0.0.1:{viewer.port} does not answer a C-ECHO" in line.getMessage()
            assert "declared" not in line.getMessage()
            assert other.received() == set()


def _move_as_viewer(port: int, study_uid: str, destination: str, cancel_after_first: bool = False) -> list:
    """A viewer's C-MOVE (pynetdicom as the SCU): every response drh-pacs sends, pending ones included."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(MOVE)
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    assoc = ae.associate("127.0.0.1", port, ae_title="DRHPACS")
    assert assoc.is_established
    responses = []
    try:
        for status, _ in assoc.send_c_move(identifier, destination, MOVE, msg_id=7):
            assert status is not None and "Status" in status, "drh-pacs stopped answering"
            responses.append(status)
            if cancel_after_first and len(responses) == 1:
                assoc.send_c_cancel(7, query_model=MOVE)
    finally:
        assoc.release()
    return responses


def test_a_forwarded_move_tells_the_viewer_what_the_pacs_does(tmp_path, redis_client, redis_server):
    """The source PACS's pending responses reach the viewer as they come, and the final response counts
    the instances the PACS sent (pynetdicom alone would answer "success, 0 completed"). A cancel from
    the viewer reaches the PACS, and the viewer is told the PACS's answer, with what was done."""
    import time

    from pynetdicom import AE, StoragePresentationContexts, evt

    study = make_study(tmp_path / "in", fixture_images()[0:4], patient_id="P-RELAY")
    received: list[str] = []

    def slow_store(event) -> int:  # a viewer on a slow link: the move takes long enough to cancel
        time.sleep(1.0)
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    viewer_ae = AE("VIEWER")
    viewer_ae.supported_contexts = StoragePresentationContexts
    viewer_port = free_port()
    handlers = [(evt.EVT_C_STORE, slow_store)]
    viewer = viewer_ae.start_server(("127.0.0.1", viewer_port), block=False, evt_handlers=handlers)
    orthanc_port = free_port()
    nodes = {"ORTHANC": f"127.0.0.1:{orthanc_port}", "VIEWER": f"127.0.0.1:{viewer_port}"}
    try:
        with running_plugin(tmp_path, redis_server.url, dicom_nodes=nodes) as plugin:
            modalities = {"DRHPACS": plugin.port, "VIEWER": viewer_port}
            with Orthanc(tmp_path, modalities, dicom_port=orthanc_port) as orthanc:
                _held_by_orthanc_only(plugin, orthanc, study)

                responses = _move_as_viewer(plugin.port, study.study_uid, "VIEWER")
                *pending, final = responses
                assert sorted(received) == sorted(study.sop_uids)
                assert final.Status == 0x0000
                assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (4, 0)
                assert "NumberOfRemainingSuboperations" not in final or final.NumberOfRemainingSuboperations is None
                assert pending, "no progress reached the viewer"
                assert all(r.Status == 0xFF00 for r in pending)
                done = [int(r.NumberOfCompletedSuboperations) for r in pending]
                assert done == sorted(done) and done[-1] >= 3
                left = [int(r.NumberOfRemainingSuboperations) for r in pending]
                assert [a + b for a, b in zip(done, left, strict=True)] == [4] * len(pending)
                snapshot = plugin.server.counters.snapshot()
                assert snapshot["move_forwards"]["success"] == 1
                # drh-pacs itself sent nothing: the sub-operations it counts stay its own
                assert snapshot["suboperations"].get("move|completed", 0) == 0

                received.clear()
                cancelled = _move_as_viewer(plugin.port, study.study_uid, "VIEWER", cancel_after_first=True)
                final = cancelled[-1]
                # Orthanc answers "cancel" only when told of it (it still sends what it had queued): the
                # viewer hears the PACS's answer, with the count of what it did receive.
                assert final.Status == 0xFE00, f"{final.Status:#06x}"
                assert int(final.NumberOfCompletedSuboperations) == len(received)
                assert plugin.server.counters.snapshot()["move_forwards"]["cancelled"] == 1
    finally:
        viewer.shutdown()


@contextlib.contextmanager
def other_stopped(scp: StoreSCP) -> Iterator[None]:
    try:
        yield
    finally:
        scp.stop()


def test_move_from_the_spool_when_the_sender_is_not_a_known_node(tmp_path, redis_client, redis_server, viewer):
    study = make_study(tmp_path / "in", fixture_images()[4:6], patient_id="P-SPOOL", rle=True)
    nodes = {"VIEWER": f"127.0.0.1:{viewer.port}"}
    with running_plugin(tmp_path, redis_server.url, dicom_nodes=nodes) as plugin:
        proc = dcmtk("storescu", "-aet", "MODALITY", "-aec", "DRHPACS", "-xr", "127.0.0.1", str(plugin.port),
                     *map(str, study.files))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        proc = movescu(plugin.port, study.study_uid)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_until(lambda: viewer.received() == set(study.sop_uids), 30, what="the viewer to receive the study")

        # Patient Root, PATIENT level: every study of the patient (metadata as the workers write it).
        for path in viewer.dir.iterdir():
            path.unlink()
        plugin.store.records.put_study(study.study_uid, {"patient_id": "P-SPOOL", "source_ae": "MODALITY"})
        proc = dcmtk(
            "movescu", "-P", "-aet", "VIEWER", "-aec", "DRHPACS", "-aem", "VIEWER",
            "-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID=P-SPOOL", "127.0.0.1", str(plugin.port),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        wait_until(lambda: viewer.received() == set(study.sop_uids), 30, what="the patient's studies")


def test_move_failures(tmp_path, redis_client, redis_server, viewer):
    study = make_study(tmp_path / "in", fixture_images()[8:9], patient_id="P-FAIL")
    nodes = {"VIEWER": f"127.0.0.1:{viewer.port}"}
    with running_plugin(tmp_path, redis_server.url, dicom_nodes=nodes) as plugin:
        assert dcmtk("storescu", "-aec", "DRHPACS", "127.0.0.1", str(plugin.port), str(study.files[0])).returncode == 0
        unknown_destination = movescu(plugin.port, study.study_uid, destination="NOBODY")
        output = unknown_destination.stdout + unknown_destination.stderr
        assert "0xa801" in output.lower() or "MoveDestinationUnknown" in output, output
        unknown_study = movescu(plugin.port, "1.2.826.0.1.3680043.8.498.424242")
        output = unknown_study.stdout + unknown_study.stderr
        assert "Failed" in output or "Failure" in output, output
        assert "no such study here" in output, output  # the ErrorComment (it was 0xC514 with none)
        assert viewer.received() == set()


def test_a_move_or_get_whose_destination_refuses_every_file_is_counted_a_failure(
    tmp_path, redis_client, redis_server, caplog
):
    """The viewer is told 0xA702 by pynetdicom; drh-pacs's own counts and log must say the same (they
    said "success" and "2 file(s) sent", from what the handler offered)."""
    import logging

    from pynetdicom import AE, StoragePresentationContexts, evt

    study = make_study(tmp_path / "in", fixture_images()[4:6], patient_id="P-FULL")
    full = AE("FULL")  # a destination whose disk is full: every C-STORE answered 0xA700
    full.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = full.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0xA700)])
    nodes = {"FULL": f"127.0.0.1:{port}"}
    try:
        with running_plugin(tmp_path, redis_server.url, dicom_nodes=nodes) as plugin:
            proc = dcmtk("storescu", "-aec", "DRHPACS", "127.0.0.1", str(plugin.port), *map(str, study.files))
            assert proc.returncode == 0, proc.stderr
            with caplog.at_level(logging.INFO, logger="drh"):
                moved = movescu(plugin.port, study.study_uid, destination="FULL")
                assert "0xa702" in (moved.stdout + moved.stderr).lower()
                wait_until(lambda: plugin.server.counters.snapshot()["requests"]["C-MOVE|failure"] == 1, 10)
            snap = plugin.server.counters.snapshot()
            assert snap["requests"]["C-MOVE|success"] == 0
            assert snap["suboperations"]["C-MOVE|failed"] == 2 and snap["suboperations"]["C-MOVE|completed"] == 0
            assert "C-MOVE from VIEWER answered 0xa702: 0 sub-operation(s) completed, 2 failed" in caplog.text
            assert "sent from the spool" not in caplog.text
    finally:
        server.shutdown()
