"""Orthanc (the Debian package) as the hospital PACS: the drop-in forwarder, queries from Orthanc, and
the backfill/reconciliation command.

Orthanc runs on a configuration directory laid out as Debian's ``/etc/orthanc`` (its own files, the
site's ``orthanc.json`` and ``credentials.json``) with the drop-in of ``deploy/orthanc`` beside them
(:class:`tests.helpers.peers.Orthanc`); studies reach it with DCMTK storescu.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import AbstractContextManager
from typing import Any

import pytest
from pydicom import dcmread

from plugin.core.redis_server import free_port
from plugin.store.broker import queue_depth
from tests.helpers.dicomgen import Study, fixture_images, make_study
from tests.helpers.peers import (
    DEBIAN_ORTHANC,
    DEPLOY_ORTHANC,
    DROP_IN,
    ORTHANC_USER,
    Orthanc,
    code,
    dcmtk,
    findscu,
    populate,
    read_orthanc_json,
    running_plugin,
)
from tests.helpers.processes import wait_until
from tests.helpers.workers import active_version

pytestmark = pytest.mark.slow  # real DICOM peers, Orthanc, workers or deployment tools


def _source_ae(path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.SourceApplicationEntityTitle).strip()


def _spooled(plugin, study) -> list:
    folder = plugin.settings.spool_dir / study.study_uid
    return sorted(folder.glob("*.dcm")) if folder.exists() else []


def _store_to_orthanc(orthanc: Orthanc, *studies) -> None:
    for study in studies:
        files = [str(f) for f in study.files]
        proc = dcmtk("storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port), *files)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("drop_in", [name for name in DROP_IN if name.endswith(".json")])
def test_the_drop_in_defines_nothing_debian_s_files_define(drop_in):
    """Orthanc refuses to start when two files of its directory define the same key ("defined in 2
    different configuration files"): the drop-in may only add keys (python.json replaces Debian's
    sample of the same name, the one file the Python plugin reads)."""
    ours = set(read_orthanc_json(DEPLOY_ORTHANC / drop_in))
    for debian in DEBIAN_ORTHANC.glob("*.json"):
        if debian.name == drop_in:
            continue
        assert not ours & set(read_orthanc_json(debian)), f"{drop_in} redefines keys of {debian.name}"


def test_orthanc_starts_with_the_drop_in_beside_debian_s_files_and_declares_drh_pacs(tmp_path):
    with Orthanc(tmp_path, {"VIEWER": free_port()}, drh_port=free_port()) as orthanc:
        modalities = orthanc.get("/modalities?expand")
        assert modalities["DRHPACS"]["AET"] == "DRHPACS" and modalities["SIMILAR"]["AET"] == "SIMILAR"
        assert "VIEWER" in modalities  # the site's own modalities stay
        assert orthanc.forwarding()["pending_count"] == 0
        log = orthanc.log()
    assert "defined in 2 different configuration files" not in log
    assert "drh-pacs: forwarding stable studies to DRHPACS" in log


def test_orthanc_forwards_every_stable_study_to_drh_pacs(tmp_path, redis_client, redis_server):
    images = fixture_images()
    studies = [
        make_study(tmp_path / "in", images[0:2], patient_id="P-ORTH-1"),
        make_study(tmp_path / "in", images[4:5], patient_id="P-ORTH-2", rle=True),
    ]
    with running_plugin(tmp_path, redis_server.url, allowed_calling_aes=["ORTHANC"]) as plugin:
        with Orthanc(tmp_path, drh_port=plugin.port) as orthanc:
            for study in studies:
                files = map(str, study.files)
                proc = dcmtk(
                    "storescu", "-aet", "MODALITY", "-aec", "ORTHANC", "-xr", "127.0.0.1", str(orthanc.dicom_port),
                    *files,
                )  # fmt: skip
                assert proc.returncode == 0, proc.stderr
            for study in studies:
                wait_until(
                    lambda s=study: len(_spooled(plugin, s)) == len(s.files),
                    60,
                    what=f"Orthanc to forward study {study.study_uid}",
                )
            wait_until(lambda: orthanc.log().count("forwarded to DRHPACS") == 2, 30, what="two forwarded studies")
            assert orthanc.forwarding()["forwarded_count"] == 2
        for study in studies:
            for path in _spooled(plugin, study):
                assert path.stem in study.sop_uids
                assert _source_ae(path) == "ORTHANC"
        wait_until(lambda: queue_depth(redis_client, "ingest") >= 3, 20, what="three indexing tasks")


def test_nothing_is_lost_while_drh_pacs_is_down_and_a_refusal_is_listed_with_its_reason(
    tmp_path, redis_client, redis_server, worker_factory
):
    """drh-pacs stopped while two studies arrive, Orthanc restarted meanwhile, then one instance that
    drh-pacs refuses: every study ends searchable or listed as refused with its reason, and Orthanc
    never logs "forwarded" for a send that failed."""
    images = fixture_images()
    good = make_study(tmp_path / "in", images[0:2], patient_id="P-FWD-1")
    mixed = make_study(tmp_path / "in", images[4:6], patient_id="P-FWD-2")
    original = mixed.files[1].read_bytes()
    broken = dcmread(mixed.files[1])
    broken.PixelData = broken.PixelData[:100]  # Orthanc keeps it; drh-pacs refuses it (truncated pixel data)
    broken.save_as(mixed.files[1])
    drh_port = free_port()
    orthanc = Orthanc(tmp_path, drh_port=drh_port).start()
    try:
        _store_to_orthanc(orthanc, good, mixed)
        ids = {uid: orthanc.study_id(uid) for uid in (good.study_uid, mixed.study_uid)}

        def pending() -> dict[str, int]:
            return {p["study"]: p["attempts"] for p in orthanc.forwarding()["pending"]}

        wait_until(lambda: len(pending()) == 2 and min(pending().values()) >= 1, 60, what="two studies pending")
        assert "NOT sent to DRHPACS" in orthanc.log() and "forwarded to DRHPACS" not in orthanc.log()
        assert "Connection refused" in orthanc.forwarding()["pending"][0]["last_error"]

        orthanc.stop()  # the record is durable: both are still pending after a restart
        orthanc.start()
        assert set(pending()) == set(ids.values())

        with running_plugin(tmp_path, redis_server.url, dicom_port=drh_port, allowed_calling_aes=["ORTHANC"]) as plugin:
            worker_factory("fwd")
            wait_until(lambda: orthanc.forwarding()["pending_count"] == 0, 60, what="Orthanc to catch up")
            report = orthanc.forwarding()
            (refused,) = report["refused"]
            assert refused["study"] == ids[mixed.study_uid] and refused["status"] == "0xC000"

            def searchable(uid: str) -> bool:
                version = active_version(redis_client)
                return bool(version) and plugin.store.codes.has(version, "study", uid)

            wait_until(lambda: searchable(good.study_uid), 240, what="the good study searchable")
            wait_until(lambda: searchable(mixed.study_uid), 120, what="the mixed study searchable from its good image")
            (why,) = plugin.store.ledger.refused()
            assert why["sop_uid"] == mixed.sop_uids[1] and "pixel data truncated" in why["reason"]
            assert why["source_ae"] == "ORTHANC" and why["status"] == "0xc000"
            keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={good.study_uid}"]
            proc, answers = findscu(plugin.port, keys, tmp_path / "rsp", called="SIMILAR", calling="ORTHANC")
            assert proc.returncode == 0 and [str(a.StudyInstanceUID) for a in answers] == [mixed.study_uid]
            log = orthanc.log()

            # the PACS corrects the instance: the study is forwarded whole, and Orthanc's list of
            # refused instances forgets it (its gauge fell only by hand before)
            import httpx

            httpx.delete(f"{orthanc.url}/instances/{refused['instance']}", auth=ORTHANC_USER, timeout=30)
            mixed.files[1].write_bytes(original)
            _store_to_orthanc(orthanc, Study(mixed.study_uid, "P-FWD-2", [mixed.files[1]], [mixed.sop_uids[1]]))
            wait_until(lambda: orthanc.forwarding()["refused_count"] == 0, 90, what="the refusal forgotten")
            assert f"study {ids[mixed.study_uid]} forwarded to DRHPACS" in orthanc.log()
            wait_until(lambda: not plugin.store.ledger.refused(), 120, what="drh-pacs's refusal gone once indexed")
    finally:
        orthanc.stop()
    assert log.count("forwarded to DRHPACS") == 1
    assert f"study {ids[good.study_uid]} forwarded to DRHPACS" in log
    assert f"study {ids[mixed.study_uid]} forwarded" not in log
    assert f"study {ids[mixed.study_uid]}: 1 instance(s) REFUSED by DRHPACS (DIMSE status 0xC000), 1 sent" in log
    # every failed attempt was logged as such, before the one success
    lines = [line for line in log.splitlines() if f"drh-pacs: study {ids[good.study_uid]}" in line]
    assert lines[-1].endswith(f"forwarded to DRHPACS (2 instance(s), attempt {len(lines)})")
    assert all("NOT sent" in line for line in lines[:-1])


def test_a_non_image_drh_pacs_takes_no_context_for_is_listed_refused_with_orthanc_s_reason(
    tmp_path, redis_client, redis_server
):
    """Under DRH_NON_IMAGE_POLICY=reject drh-pacs accepts no context for a report (Basic Text SR):
    Orthanc cannot send it, and the forwarder's warning ended "lists them," with no reason."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    study = make_study(tmp_path / "in", fixture_images()[0:1], patient_id="P-FWD-SR")
    report = dcmread(study.files[0], stop_before_pixels=True)
    for keyword in [e.keyword for e in report if e.tag.group >= 0x0018]:
        delattr(report, keyword)
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.SOPInstanceUID, report.SeriesInstanceUID, report.StudyInstanceUID = (
        generate_uid(),
        generate_uid(),
        study.study_uid,
    )
    report.Modality = "SR"
    report.file_meta = FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = report.SOPClassUID
    report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report_path = tmp_path / "in" / "report.dcm"
    report.save_as(report_path, enforce_file_format=True)
    drh_port = free_port()
    with running_plugin(tmp_path, redis_server.url, dicom_port=drh_port, allowed_calling_aes=["ORTHANC"],
                        non_image_policy="reject") as plugin:  # fmt: skip
        with Orthanc(tmp_path, drh_port=drh_port) as orthanc:
            _store_to_orthanc(orthanc, Study(study.study_uid, "P-FWD-SR", [*study.files, report_path], []))
            wait_until(lambda: orthanc.forwarding()["refused_count"] == 1, 90, what="the report refused")
            wait_until(lambda: len(_spooled(plugin, study)) == 1, 30, what="the image forwarded")
            line = next(x for x in orthanc.log().splitlines() if "REFUSED by DRHPACS" in x)
    assert "1 instance(s) REFUSED by DRHPACS (refused), 1 sent; GET /drh-pacs/forwarding lists them; Orthanc: " in line
    assert "drh-pacs accepted no presentation context for that SOP class" in line
    assert not line.endswith(",")


def _study_with_a_big_instance(tmp_path, limit: int) -> Study:
    """Two instances: the first under ``limit`` bytes, the second over it (a private OB element)."""
    study = make_study(tmp_path / "in", fixture_images()[0:2], patient_id="P-FWD-BIG")
    big = dcmread(study.files[1])
    big.private_block(0x0011, "DRH TEST", create=True).add_new(0x01, "OB", b"\0" * (limit + 1_000_000))
    big.save_as(study.files[1])
    assert study.files[0].stat().st_size < limit < study.files[1].stat().st_size
    return study


def _drh_pacs_taking_up_to(tmp_path, redis_server, port: int, max_dataset_size: int) -> AbstractContextManager[Any]:
    """drh-pacs's DICOM listener for Orthanc, aborting on a dataset over ``max_dataset_size`` bytes."""
    return running_plugin(
        tmp_path, redis_server.url, dicom_port=port, allowed_calling_aes=["ORTHANC"], max_dataset_size=max_dataset_size
    )


def test_an_instance_over_drh_pacs_s_dataset_limit_is_listed_refused_the_rest_sent_and_it_can_be_sent_again(
    tmp_path, redis_server
):
    """drh-pacs aborts the association on a dataset over DRH_MAX_DATASET_SIZE. Orthanc's forwarder,
    seeing the association drop while drh-pacs answers a C-ECHO, sends the study one instance at a
    time and lists the instance whose file is over its MaxDatasetSize as refused, with the reason;
    before, it sent the whole study again every 10 minutes for ever. Once drh-pacs takes larger
    datasets, ``POST /drh-pacs/resend`` sends the study again and the refusal is forgotten."""
    import httpx

    limit = 2_000_000
    study = _study_with_a_big_instance(tmp_path, limit)
    drh_port = free_port()
    orthanc = Orthanc(tmp_path, drh_port=drh_port, drop_in_settings={"MaxDatasetSize": limit}).start()
    try:
        with _drh_pacs_taking_up_to(tmp_path, redis_server, drh_port, limit) as plugin:
            _store_to_orthanc(orthanc, study)
            orthanc_id = orthanc.study_id(study.study_uid)
            wait_until(lambda: orthanc.forwarding()["refused_count"] == 1, 90, what="the big instance refused")
            report = orthanc.forwarding()
            assert report["pending_count"] == 0  # not sent again and again
            (refused,) = report["refused"]
            assert refused["status"] == "association aborted" and "over drh-pacs's limit" in refused["details"]
            assert refused["instance"] in {i["ID"] for i in orthanc.get(f"/studies/{orthanc_id}/instances")}
            assert [f.stem for f in _spooled(plugin, study)] == [study.sop_uids[0]]  # the rest was sent
            assert plugin.server.counters.admission_refusals()["dataset-too-large"] >= 2  # what status shows
        log = orthanc.log()
        assert "1 instance(s) REFUSED by DRHPACS (association aborted), 1 sent" in log
        assert "DRH_MAX_DATASET_SIZE" in log

        with _drh_pacs_taking_up_to(tmp_path, redis_server, drh_port, 4 * limit) as plugin:
            resend = f"{orthanc.url}/drh-pacs/resend"
            assert httpx.post(resend, auth=ORTHANC_USER, content="nonsense", timeout=30).status_code == 400
            unknown = "00000000-00000000-00000000-00000000-00000000"
            assert httpx.post(resend, auth=ORTHANC_USER, content=unknown, timeout=30).status_code == 404
            answer = httpx.post(resend, auth=ORTHANC_USER, content=orthanc_id, timeout=30)
            assert answer.status_code == 200 and answer.json() == {"pending": orthanc_id}
            wait_until(lambda: orthanc.forwarding()["refused_count"] == 0, 90, what="the refusal forgotten")
            assert sorted(f.stem for f in _spooled(plugin, study)) == sorted(study.sop_uids)
            wait_until(lambda: f"study {orthanc_id} forwarded to DRHPACS (2 instance(s)" in orthanc.log(), 30,
                       what="the study forwarded whole")  # fmt: skip
    finally:
        orthanc.stop()


def test_an_instance_drh_pacs_aborts_on_under_the_forwarder_s_limit_stays_pending_and_the_rest_is_sent(
    tmp_path, redis_server
):
    """When nothing says the instance is too large (the forwarder's MaxDatasetSize is above it: a
    timeout, the network or a limit set differently on drh-pacs), an association that drops on it
    again a few seconds later keeps the study pending, retried with the back-off, never refused for
    good; the rest of the study is sent, and a study behind it is not held up."""
    limit = 2_000_000
    study = _study_with_a_big_instance(tmp_path, limit)
    other = make_study(tmp_path / "other", fixture_images()[2:3], patient_id="P-FWD-OTHER")
    drh_port = free_port()
    orthanc = Orthanc(tmp_path, drh_port=drh_port, drop_in_settings={"MaxDatasetSize": 10 * limit}).start()
    try:
        with _drh_pacs_taking_up_to(tmp_path, redis_server, drh_port, limit) as plugin:
            _store_to_orthanc(orthanc, study)
            orthanc_id = orthanc.study_id(study.study_uid)

            def attempts() -> int:
                return sum(p["attempts"] for p in orthanc.forwarding()["pending"] if p["study"] == orthanc_id)

            wait_until(lambda: attempts() >= 1, 90, what="the study pending after a dropped instance")
            report = orthanc.forwarding()
            assert report["link_error"] == "" and report["link_retry_seconds"] == 0  # nothing else held up
            _store_to_orthanc(orthanc, other)
            wait_until(lambda: len(_spooled(plugin, other)) == 1, 60, what="the study behind it sent")

            def stored() -> int:
                return plugin.server.counters.snapshot()["requests"].get("C-STORE|success", 0)

            wait_until(lambda: attempts() >= 2, 60, what="a second attempt")
            before = stored()
            wait_until(lambda: attempts() >= 3, 60, what="a third attempt")
            assert stored() == before  # only the instance left is sent again, not the whole study
            report = orthanc.forwarding()
            assert report["refused_count"] == 0 and report["link_error"] == ""
            (pending,) = [p for p in report["pending"] if p["study"] == orthanc_id]
            assert "twice, while drh-pacs answers a C-ECHO" in pending["last_error"]
            assert [f.stem for f in _spooled(plugin, study)] == [study.sop_uids[0]]
    finally:
        orthanc.stop()
    assert f"study {orthanc_id} forwarded" not in orthanc.log()


def test_a_study_announced_stable_again_while_it_is_sent_is_sent_again_with_the_images_that_came(tmp_path):
    """Orthanc fixes a store job's instances when it creates the job: a series that arrives while the
    study is being sent, making the study stable again, is not in that job. The second announcement
    keeps the study on record, and it is sent again. Also: a state file of the previous release (no
    count of announcements) is read, its pending study sent (here: gone from Orthanc, so dropped)."""
    import sqlite3
    import threading

    from pynetdicom import AE, StoragePresentationContexts, evt

    images = fixture_images()
    first = make_study(tmp_path / "in", images[0:1], patient_id="P-AGAIN")
    later = make_study(tmp_path / "later", images[1:2], patient_id="P-AGAIN", study_uid=first.study_uid)
    received: list[str] = []
    in_first_send, release = threading.Event(), threading.Event()

    def on_store(event):  # drh-pacs's listener, slow on the first send (a big study, a busy link)
        received.append(str(event.request.AffectedSOPInstanceUID))
        in_first_send.set()
        release.wait(8)  # under Orthanc's DicomScuTimeout (10 s)
        return 0x0000

    scp = AE("DRHPACS")
    scp.supported_contexts = StoragePresentationContexts
    drh_port = free_port()
    server = scp.start_server(("127.0.0.1", drh_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    orthanc = Orthanc(tmp_path, drh_port=drh_port)
    old = sqlite3.connect(orthanc.dir / "drh-pacs-forward.sqlite")
    old.executescript(
        "CREATE TABLE pending (study TEXT PRIMARY KEY, queued REAL, attempts INTEGER DEFAULT 0,"
        " next_try REAL, last_error TEXT DEFAULT '');"
        "INSERT INTO pending (study, queued, next_try) VALUES ('0f0f0f0f-0f0f0f0f-0f0f0f0f-0f0f0f0f-0f0f0f0f', 0, 0);"
    )
    old.close()
    try:
        orthanc.start()
        wait_until(lambda: orthanc.forwarding()["pending_count"] == 0, 30, what="the old file's pending study")
        assert "study 0f0f0f0f-0f0f0f0f-0f0f0f0f-0f0f0f0f-0f0f0f0f was deleted from Orthanc" in orthanc.log()
        _store_to_orthanc(orthanc, first)
        assert in_first_send.wait(60), "Orthanc never sent the study"
        _store_to_orthanc(orthanc, later)  # a new series while the first send is held

        def stable_announcements() -> int:
            changes = orthanc.get("/changes?since=0&limit=1000")["Changes"]
            return sum(1 for c in changes if c["ChangeType"] == "StableStudy")

        wait_until(lambda: stable_announcements() == 2, 7, what="the study stable again during the send")
        release.set()
        wait_until(lambda: later.sop_uids[0] in received, 60, what="the later series sent")
        wait_until(lambda: orthanc.forwarding()["pending_count"] == 0, 30, what="nothing pending")
        assert set(received) == set(first.sop_uids + later.sop_uids)
        log = orthanc.log()
        assert "announced stable again meanwhile: sent again" in log
        assert log.count(f"study {orthanc.study_id(first.study_uid)} forwarded to DRHPACS") == 2
    finally:
        release.set()
        orthanc.stop()
        server.shutdown()


def test_similar_query_from_orthanc_s_rest_api_and_its_forms(tmp_path, redis_client, redis_server):
    """The README's Orthanc REST call, and Orthanc Explorer's query form (AccessionNumber), through the
    SIMILAR modality the drop-in declares: ranked studies, rank and score readable in the answer.
    Queries closed to undeclared AEs, as in production: Orthanc is declared a viewer (deploy/orthanc)."""
    ref, near, mid, far = (f"1.2.826.0.1.3680043.8.498.30{n}" for n in range(4))
    orthanc_port = free_port()
    with running_plugin(
        tmp_path, redis_server.url, allowed_calling_aes=["ORTHANC"], dicom_query_open=False,
        dicom_viewers={"ORTHANC": f"127.0.0.1:{orthanc_port}"},
    ) as plugin:  # fmt: skip
        meta = {"study_date": "20240101", "modalities": "DX", "study_description": "CHEST PA", "n_instances": "1"}
        populate(
            plugin.store,
            {
                ref: (code("0000 0000 0000 0000"), {**meta, "patient_id": "P1", "accession_number": "A-REF"}),
                near: (code("0000 0000 0000 0001"), {**meta, "patient_id": "P2", "accession_number": "A-NEAR"}),
                mid: (code("0000 0000 0000 0111"), {**meta, "patient_id": "P3", "accession_number": "A-MID"}),
                far: (code("1111 1111 0000 0000"), {**meta, "patient_id": "P4", "accession_number": "A-FAR"}),
            },
        )
        plugin.store.records.put_instance(near + ".1.1", near, {"series_uid": near + ".1", "modality": "DX"})
        with Orthanc(tmp_path, drh_port=plugin.port, dicom_port=orthanc_port) as orthanc:
            query = orthanc.post("/modalities/SIMILAR/query", {"Level": "Study", "Query": {"StudyInstanceUID": ref}})
            answers = orthanc.get(f"/queries/{query['ID']}/answers?expand&simplify")
            assert [a["StudyInstanceUID"] for a in answers] == [near, mid, far]
            assert [a["StudyDescription"] for a in answers] == [
                "#01 0.938 CHEST PA",
                "#02 0.812 CHEST PA",
                "#03 0.500 CHEST PA",
            ]

            form = orthanc.post("/modalities/SIMILAR/query", {"Level": "Study", "Query": {"AccessionNumber": "A-REF"}})
            answers = orthanc.get(f"/queries/{form['ID']}/answers?expand&simplify")
            assert [a["StudyInstanceUID"] for a in answers] == [near, mid, far]

            # opening the first answer: Orthanc asks SIMILAR for its series, answered as a plain query
            series = orthanc.post(f"/queries/{form['ID']}/answers/0/query-series", {})
            answers = orthanc.get(f"/queries/{series['ID']}/answers?expand&simplify")
            assert [a["SeriesInstanceUID"] for a in answers] == [near + ".1"]


def _backfill(settings, orthanc, *extra: str, password: str = ORTHANC_USER[1]) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DRH_REDIS_URL": settings.redis_url,
        "DRH_DATA_DIR": str(settings.data_dir),
        "DRH_ORTHANC_URL": orthanc.url,
        "DRH_ORTHANC_USER": ORTHANC_USER[0],
        "DRH_ORTHANC_PASSWORD": password,
    }
    return subprocess.run(
        [sys.executable, "-m", "plugin.cli", "backfill", "orthanc", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )


def test_backfill_walks_an_existing_archive_resumably_then_follows_orthanc_s_changes(
    tmp_path, redis_client, redis_server
):
    images = fixture_images()
    studies = [make_study(tmp_path / "in", images[n : n + 1], patient_id=f"P-BF-{n}") for n in range(4)]
    with running_plugin(tmp_path, redis_server.url) as plugin:
        with Orthanc(tmp_path, forward=False) as orthanc:
            _store_to_orthanc(orthanc, *studies[:3])
            wait_until(lambda: len(orthanc.get("/studies")) == 3, 30, what="Orthanc to hold three studies")
            # A settled archive: Orthanc logs each study's StableStudy change a StableAge after its last
            # instance. One logged after the walk below would (rightly) be read again by the third run.
            wait_until(
                lambda: all(orthanc.get(f"/studies/{s}")["IsStable"] for s in orthanc.get("/studies")),
                30,
                what="Orthanc's three studies to be stable",
            )

            first = _backfill(plugin.settings, orthanc, "--limit", "1")
            assert first.returncode == 0, first.stderr
            assert "1 new study(ies), 1 instance(s) queued" in first.stdout
            assert sum(len(_spooled(plugin, s)) for s in studies) == 1

            second = _backfill(plugin.settings, orthanc)
            assert second.returncode == 0, second.stderr
            assert "2 new study(ies), 2 instance(s) queued" in second.stdout
            assert "1 study(ies) done in earlier runs" in second.stdout
            assert "backfill orthanc" in second.stderr  # the progress bar

            # the walk is done: from now on only Orthanc's change log is read
            third = _backfill(plugin.settings, orthanc)
            assert third.returncode == 0, third.stderr
            assert "0 study(ies) changed in Orthanc since change" in third.stdout
            _store_to_orthanc(orthanc, studies[3])
            fourth = _backfill(plugin.settings, orthanc)
            assert "1 study(ies) changed in Orthanc" in fourth.stdout and "1 instance(s) queued" in fourth.stdout

            again = _backfill(plugin.settings, orthanc, "--restart")
            assert "4 new study(ies), 0 instance(s) queued, 4 already present" in again.stdout

        for study in studies:
            (path,) = _spooled(plugin, study)
            assert _source_ae(path) == "ORTHANC"
        assert queue_depth(redis_client, "ingest") == 4


def _set_sop_uid(path, sop_uid: str) -> None:
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.save_as(path)


def test_backfill_refuses_an_instance_without_a_valid_uid_and_walks_on(tmp_path, redis_client, redis_server):
    """Years-old archives hold UIDs no conformant tool would write. One with a leading zero in a
    component (older equipment wrote them) is indexed; one drh-pacs cannot take (a letter in its SOP
    Instance UID) is refused with its reason, and the walk goes on to the studies after it: before,
    every run stopped at that study, and nothing after it in the archive was ever indexed."""
    images = fixture_images()
    good, zeros, bad = (make_study(tmp_path / "in", images[n : n + 1], patient_id=f"P-UID-{n}") for n in range(3))
    zero_uid, bad_uid = "1.2.826.0.1.3680043.8.498.1507184833.035541", "1.2.826.0.1.3680043.8.498.77x"
    _set_sop_uid(zeros.files[0], zero_uid)
    _set_sop_uid(bad.files[0], bad_uid)
    with running_plugin(tmp_path, redis_server.url) as plugin:
        with Orthanc(tmp_path, forward=False) as orthanc:
            _store_to_orthanc(orthanc, good, zeros, bad)
            wait_until(lambda: len(orthanc.get("/instances")) == 3, 30, what="Orthanc to hold the three")
            first = _backfill(plugin.settings, orthanc)
            assert first.returncode == 0, first.stderr
            assert "3 new study(ies), 2 instance(s) queued" in first.stdout
            assert "1 instance(s) REFUSED (`drh-pacs failures refused` says why)" in first.stdout
            (why,) = plugin.store.ledger.refused()
            assert why["sop_uid"] == bad_uid and why["study_uid"] == bad.study_uid
            assert "invalid Study/SOP Instance UID" in why["reason"] and why["source_ae"] == "ORTHANC"
            again = _backfill(plugin.settings, orthanc, "--restart")  # the refused one is not tried again
            assert again.returncode == 0, again.stderr
            # the refused one is still counted refused, not "already present" (it is not in drh-pacs)
            assert "3 new study(ies), 0 instance(s) queued, 2 already present" in again.stdout
            assert "1 instance(s) REFUSED" in again.stdout and len(plugin.store.ledger.refused()) == 1
        (path,) = _spooled(plugin, zeros)
        assert path.stem == zero_uid
        assert [p.stem for p in _spooled(plugin, good)] == good.sop_uids and not _spooled(plugin, bad)
        assert queue_depth(redis_client, "ingest") == 2


def test_serve_s_scheduled_reconciliation_indexes_what_orthanc_did_not_forward(tmp_path, redis_client, redis_server):
    from plugin.ops.orthanc import ScheduledReconcile

    images = fixture_images()
    before, missed = (make_study(tmp_path / "in", images[n : n + 1], patient_id=f"P-SR-{n}") for n in range(2))
    with running_plugin(tmp_path, redis_server.url) as plugin:
        with Orthanc(tmp_path, forward=False) as orthanc:  # no forwarder: only the reconciliation brings studies
            _store_to_orthanc(orthanc, before)
            settings = plugin.settings.replace(
                orthanc_url=orthanc.url,
                orthanc_user=ORTHANC_USER[0],
                orthanc_password=ORTHANC_USER[1],
                orthanc_reconcile_seconds=0.5,
            )
            schedule = ScheduledReconcile(settings).start()
            try:
                progress = plugin.store.backfill(orthanc.url)
                wait_until(lambda: progress.since() is not None, 30, what="the schedule to follow Orthanc's changes")
                _store_to_orthanc(orthanc, missed)
                wait_until(lambda: _spooled(plugin, missed), 60, what="the missed study to be reconciled")
            finally:
                schedule.stop()
            assert progress.info()["last_error"] == "" and float(progress.info()["last_ok"]) > 0
            # the schedule never walks the archive by itself: what Orthanc held before is the command's job
            assert not _spooled(plugin, before)
        assert queue_depth(redis_client, "ingest") == 1


def test_backfill_says_when_orthanc_is_unreachable_or_refuses_the_password(tmp_path, redis_server):
    with running_plugin(tmp_path, redis_server.url) as plugin:

        class Nowhere:
            url = f"http://127.0.0.1:{free_port()}"

        proc = _backfill(plugin.settings, Nowhere)
        assert proc.returncode == 1
        assert "cannot reach Orthanc" in proc.stderr and "run it again to resume" in proc.stderr

        with Orthanc(tmp_path, forward=False) as orthanc:
            proc = _backfill(plugin.settings, orthanc, password="wrong-password")
        assert proc.returncode == 1
        assert "refused the credentials (user 'drh-pacs', HTTP 401)" in proc.stderr
        assert "run it again" not in proc.stderr
        assert plugin.store.backfill(orthanc.url).info()["last_error"].startswith("Orthanc at")
