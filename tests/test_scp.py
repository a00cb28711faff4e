"""The plugin's SCP against real DICOM peers (DCMTK tools, a pynetdicom SCU) and a real Redis.

Codes and study metadata are written through CodeStore as the workers would, so these tests need
no model; the end-to-end test of issue 2 covers the path through a real worker.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, StudyRootQueryRetrieveInformationModelFind

from plugin.dicom import status as st
from plugin.store.broker import queue_depth
from tests.helpers.dicomgen import fixture_images, make_instance, make_study
from tests.helpers.peers import code, dcmtk, findscu, populate, running_plugin
from tests.helpers.processes import wait_until
from tests.helpers.tls import certificates

pytestmark = pytest.mark.slow  # real DICOM peers, Orthanc, workers or deployment tools

ALLOWED = ["VIEWER", "STORESCU", "PACS"]


@pytest.fixture
def plugin(tmp_path, redis_client, redis_server):
    with running_plugin(tmp_path, redis_server.url, allowed_calling_aes=ALLOWED) as running:
        yield running


def _queued(redis_client) -> int:
    return queue_depth(redis_client, "ingest")


# -- association rules --------------------------------------------------------------------------------
def test_echo_on_both_titles_and_rejections(plugin):
    port = str(plugin.port)
    assert dcmtk("echoscu", "-aet", "VIEWER", "-aec", "DRHPACS", "127.0.0.1", port).returncode == 0
    assert dcmtk("echoscu", "-aet", "VIEWER", "-aec", "SIMILAR", "127.0.0.1", port).returncode == 0
    wrong_called = dcmtk("echoscu", "-aet", "VIEWER", "-aec", "NOTUS", "127.0.0.1", port)
    assert wrong_called.returncode != 0
    assert "Called AE Title Not Recognized" in wrong_called.stderr + wrong_called.stdout
    unknown_calling = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "DRHPACS", "127.0.0.1", port)
    assert unknown_calling.returncode != 0
    assert "Calling AE Title Not Recognized" in unknown_calling.stderr + unknown_calling.stdout


def test_address_allow_list(tmp_path, redis_client, redis_server):
    with running_plugin(tmp_path, redis_server.url, allowed_addresses=["10.9.8.7"]) as running:
        refused = dcmtk("echoscu", "-aet", "VIEWER", "-aec", "DRHPACS", "127.0.0.1", str(running.port))
        assert refused.returncode != 0
    with running_plugin(tmp_path / "b", redis_server.url, allowed_addresses=["127.0.0.1"]) as running:
        ok = dcmtk("echoscu", "-aet", "VIEWER", "-aec", "DRHPACS", "127.0.0.1", str(running.port))
        assert ok.returncode == 0, ok.stderr


# -- storage ----------------------------------------------------------------------------------------
def test_storescu_uncompressed_and_compressed_syntaxes_are_spooled_and_queued(tmp_path, plugin, redis_client):
    from hashing.preprocess import load_pixels

    images = fixture_images("normal")[:2]
    plain = make_study(tmp_path / "in", images, patient_id="P-STORE")
    rle = make_study(tmp_path / "in", images[:1], patient_id="P-STORE", study_uid=plain.study_uid, rle=True)
    jpeg = tmp_path / "jpeg-lossless.dcm"
    jpeg_ls = tmp_path / "jpeg-ls.dcm"
    assert dcmtk("dcmcjpeg", str(plain.files[0]), str(jpeg)).returncode == 0
    assert dcmtk("dcmcjpls", str(plain.files[1]), str(jpeg_ls)).returncode == 0
    j2k = tmp_path / "jpeg2000.dcm"  # DCMTK has no JPEG 2000 encoder: pydicom + openjpeg
    j2k_ds = dcmread(plain.files[0])
    j2k_ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    j2k_ds.save_as(j2k)
    # The compressed copies keep the SOP Instance UID: send them as new instances of the study.
    for path in (jpeg, jpeg_ls, j2k):
        ds = dcmread(path)
        ds.StudyInstanceUID = rle.study_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path)
    port = str(plugin.port)
    sends = [
        (["-xe"], plain.files, ExplicitVRLittleEndian),
        (["-xr"], rle.files, RLELossless),
        (["-xs"], [jpeg], JPEGLosslessSV1),
        (["-xt"], [jpeg_ls], JPEGLSLossless),
        (["-xv"], [j2k], JPEG2000Lossless),
    ]
    for flags, files, _ in sends:
        proc = dcmtk("storescu", "-aet", "STORESCU", "-aec", "DRHPACS", *flags, "127.0.0.1", port, *map(str, files))
        assert proc.returncode == 0, proc.stderr

    spool = plugin.settings.spool_dir
    for _, files, syntax in sends:
        for f in files:
            sop = dcmread(f, stop_before_pixels=True).SOPInstanceUID
            stored = spool / plain.study_uid / f"{sop}.dcm"
            assert stored.exists(), f"{sop} not in the spool"
            ds = dcmread(stored)
            assert ds.file_meta.TransferSyntaxUID == syntax
            assert ds.file_meta.SourceApplicationEntityTitle.strip() == "STORESCU"
            image = load_pixels(ds)  # what a worker will do with it: the file is complete and decodable
            assert image.ndim == 2 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert not list(spool.rglob("*.part")), "temp files left in the spool"
    wait_until(lambda: _queued(redis_client) >= 6, 20, what="six indexing tasks in the ingest queue")


def test_the_readmes_send_command_sends_a_folder_of_mixed_transfer_syntaxes(tmp_path, plugin, redis_client):
    """The first try's command, read from the README: a folder with uncompressed, RLE, JPEG lossless
    and JPEG 2000 files goes whole in one command (storescu's defaults, the README's command before,
    propose uncompressed only and stop at the first compressed file)."""
    import re
    import shlex

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    command = shlex.split(re.search(r"`(dcmsend -aet MODALITY[^`]*)`", readme).group(1))
    assert command[-4:] == ["+r", "localhost", "11112", "<folder>"], command
    command[command.index("-aet") + 1] = "STORESCU"  # the sender this test's listener knows
    images = fixture_images("normal")[:2]
    folder = tmp_path / "folder"
    plain = make_study(folder, images, patient_id="P-FOLDER")
    rle = make_study(folder, images[:1], patient_id="P-FOLDER", study_uid=plain.study_uid, rle=True)
    jpeg, j2k = folder / "jpeg.dcm", folder / "j2k.dcm"
    assert dcmtk("dcmcjpeg", str(plain.files[0]), str(jpeg)).returncode == 0
    j2k_ds = dcmread(plain.files[0])
    j2k_ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    j2k_ds.save_as(j2k)
    for path in (jpeg, j2k):  # new instances of the study
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path)
    sent = dcmtk(*command[:-3], "127.0.0.1", str(plugin.port), str(folder))
    assert sent.returncode == 0, sent.stderr
    for f in (*plain.files, *rle.files, jpeg, j2k):  # every one (dcmsend may send a lossless one decompressed)
        sop = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert (plugin.settings.spool_dir / plain.study_uid / f"{sop}.dcm").exists(), f"{f.name} not received"


def test_a_file_whose_uids_are_stored_as_un_is_refused_and_the_rest_of_the_send_goes_on(tmp_path, plugin):
    """DCMTK reads a SOPClassUID stored with VR UN as "31" and puts that in the C-STORE command;
    pynetdicom aborted the whole association on that unknown class, and every later file of the
    dcmsend run was never sent (124 of 149 from a real folder)."""
    import struct

    folder = tmp_path / "folder"
    study = make_study(folder, fixture_images("normal")[:2], patient_id="P-UN")
    odd = dcmread(study.files[0])
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    odd_path = folder / study.study_uid / "0-un.dcm"  # sent first
    odd.save_as(odd_path, enforce_file_format=True)
    data = odd_path.read_bytes()  # SOP Class and Instance UIDs as an archive may keep them: VR UN
    for element in (0x0016, 0x0018):
        header = struct.pack("<HH", 0x0008, element) + b"UI"
        at = data.index(header, 132)  # in the dataset, after the file meta
        (length,) = struct.unpack("<H", data[at + 6 : at + 8])
        un = struct.pack("<HH", 0x0008, element) + b"UN\0\0" + struct.pack("<I", length)
        data = data[:at] + un + data[at + 8 :]
    odd_path.write_bytes(data)
    sent = dcmtk("dcmsend", "-v", "-aet", "STORESCU", "-aec", "DRHPACS", "+sd", "+r", "-nh", "127.0.0.1",
                 str(plugin.port), str(folder))  # fmt: skip
    output = sent.stdout + sent.stderr
    assert "Received C-STORE Response (Refused: SOPClassNotSupported)" in output, output
    assert "with status SUCCESS  : 2" in output, output
    spooled = {p.stem for p in (plugin.settings.spool_dir / study.study_uid).glob("*.dcm")}
    assert spooled == set(study.sop_uids)  # the rest of the send arrived
    assert plugin.server.counters.snapshot()["associations"].get("aborted", 0) == 0
    refused = wait_until(lambda: plugin.store.ledger.refused(), 10, what="the refusal recorded")
    assert "names SOP class '31'" in refused[0]["reason"]


def _scu(port: int, calling: str = "STORESCU") -> tuple[AE, object]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, [ExplicitVRLittleEndian])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11", [ExplicitVRLittleEndian])  # Basic Text SR
    assoc = ae.associate("127.0.0.1", port, ae_title="DRHPACS")
    assert assoc.is_established
    return ae, assoc


def test_malformed_datasets_fail_and_the_association_goes_on(tmp_path, plugin, redis_client):
    study_uid = generate_uid()
    good = make_instance(fixture_images()[0], study_uid=study_uid, series_uid=generate_uid())
    truncated = make_instance(fixture_images()[1], study_uid=study_uid, series_uid=generate_uid())
    truncated_path = tmp_path / "truncated.dcm"
    truncated.save_as(truncated_path, enforce_file_format=True)
    data = truncated_path.read_bytes()
    truncated_path.write_bytes(data[: len(data) - 4000])  # the transfer was cut in the pixel data
    no_study = make_instance(fixture_images()[2], study_uid=study_uid, series_uid=generate_uid())
    del no_study.StudyInstanceUID

    _, assoc = _scu(plugin.port)
    try:
        status = assoc.send_c_store(truncated_path)  # sent as read: pynetdicom does not re-encode a path
        assert status.Status == st.STORE_CANNOT_UNDERSTAND
        assert "truncated" in status.ErrorComment
        status = assoc.send_c_store(no_study)
        assert status.Status == st.STORE_CANNOT_UNDERSTAND
        assert "UID" in status.ErrorComment
        assert assoc.is_established
        status = assoc.send_c_store(good)
        assert status.Status == st.SUCCESS
    finally:
        assoc.release()
    spooled = sorted(p.stem for p in (plugin.settings.spool_dir / study_uid).glob("*.dcm"))
    assert spooled == [good.SOPInstanceUID]


def test_non_image_objects_are_accepted_and_ignored(plugin, redis_client):
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPInstanceUID = generate_uid()
    sr.StudyInstanceUID = generate_uid()
    sr.SeriesInstanceUID = generate_uid()
    sr.Modality = "SR"
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _, assoc = _scu(plugin.port)
    try:
        assert assoc.send_c_store(sr).Status == st.SUCCESS
    finally:
        assoc.release()
    assert not (plugin.settings.spool_dir / sr.StudyInstanceUID).exists()
    # counted as the workers count what they ignore: in the totals and under its modality
    wait_until(lambda: plugin.store.stats.by_modality().get("SR", {}).get("ignored") == 1, 10, what="SR counted")


def test_non_image_objects_refused_at_negotiation_by_configuration(tmp_path, redis_client, redis_server, caplog):
    """The sender sees only "no acceptable presentation context", and nothing reaches the refused
    ledger: drh-pacs counts the refused contexts and logs their SOP classes."""
    import logging

    from pynetdicom.sop_class import StorageCommitmentPushModel

    with running_plugin(tmp_path, redis_server.url, non_image_policy="reject") as running:
        ae = AE(ae_title="STORESCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, [ExplicitVRLittleEndian])
        for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):  # one class, two contexts
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11", [syntax])  # Basic Text SR
        ae.add_requested_context(StorageCommitmentPushModel)  # not a stored object: not "non-image"
        with caplog.at_level(logging.INFO, logger="drh"):
            assoc = ae.associate("127.0.0.1", running.port, ae_title="DRHPACS")
        try:
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            assert DigitalXRayImageStorageForPresentation in accepted
            assert "1.2.840.10008.5.1.4.1.1.88.11" not in accepted
        finally:
            assoc.release()
        assert running.server.counters.snapshot()["contexts_rejected"] == {"non-image": 1, "other": 1}
        assert "association from STORESCU: 1 non-image storage class(es) refused (Basic Text SR Storage)" in caplog.text


def test_files_spooled_while_the_broker_is_down_are_queued_by_the_reconciler(tmp_path, redis_client, redis_server):
    """A file in the spool that no task covers (the broker was down) is queued at start-up."""
    from plugin.dicom.spool import Spool

    ds = make_instance(fixture_images()[3], study_uid=generate_uid(), series_uid=generate_uid())
    settings_dir = tmp_path
    spool = Spool(settings_dir / "data" / "spool")
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    spool.write(ds.StudyInstanceUID, ds.SOPInstanceUID, path.read_bytes())
    before = _queued(redis_client)
    with running_plugin(settings_dir, redis_server.url):
        wait_until(lambda: _queued(redis_client) > before, 20, what="the reconciler to queue the spooled file")


# -- the similar-studies query ---------------------------------------------------------------------------
REF = "1.2.826.0.1.3680043.8.498.100"
NEAR = "1.2.826.0.1.3680043.8.498.101"
MID = "1.2.826.0.1.3680043.8.498.102"
FAR = "1.2.826.0.1.3680043.8.498.103"
OTHER_CT = "1.2.826.0.1.3680043.8.498.104"
PENDING_STUDY = "1.2.826.0.1.3680043.8.498.105"


def _meta(pid: str, date: str, modality: str = "DX", source: str = "PACS") -> dict[str, str]:
    return {
        "patient_id": pid,
        "patient_name": f"NAME^{pid}",
        "study_date": date,
        "study_time": "101500",
        "study_description": "CHEST PA",
        "accession_number": f"ACC{pid}",
        "modalities": modality,
        "body_part": "CHEST",
        "n_instances": "2",
        "source_ae": source,
    }


@pytest.fixture
def archive(plugin):
    populate(
        plugin.store,
        {
            REF: (code("0000 0000 0000 0000"), _meta("P1", "20240301")),
            NEAR: (code("0000 0000 0000 0001"), _meta("P1", "20230101")),
            MID: (code("0000 0000 0000 0111"), _meta("P2", "20220101")),
            FAR: (code("1111 1111 0000 0000"), _meta("P3", "20210101")),
            OTHER_CT: (code("0000 0000 0000 0011"), _meta("P4", "20240101", "CT")),
        },
    )
    plugin.store.records.put_study(PENDING_STUDY, _meta("P5", "20240102"))  # received, no study code yet
    return plugin


def _distances(responses: list[Dataset]) -> list[tuple[str, int, int, float]]:
    return [
        (
            str(r.StudyInstanceUID),
            int(st.private_text(r, st.RANK)),
            int(st.private_text(r, st.DISTANCE)),
            float(st.private_text(r, st.SCORE)),
        )
        for r in responses
    ]


def test_findscu_similar_by_called_ae(tmp_path, archive):
    keys = [
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={REF}",
        "PatientID=",
        "PatientName=",
        "StudyDate=",
        "StudyDescription=",
        "AccessionNumber=",
        "ModalitiesInStudy=",
        "NumberOfStudyRelatedInstances=",
        "RetrieveAETitle=",
    ]
    proc, responses = findscu(archive.port, keys, tmp_path / "rsp", called="SIMILAR")
    assert proc.returncode == 0, proc.stderr
    assert _distances(responses) == [
        (NEAR, 1, 1, pytest.approx(1 - 1 / 16, abs=1e-4)),
        (OTHER_CT, 2, 2, pytest.approx(1 - 2 / 16, abs=1e-4)),
        (MID, 3, 3, pytest.approx(1 - 3 / 16, abs=1e-4)),
        (FAR, 4, 8, pytest.approx(0.5, abs=1e-4)),
    ]
    first = responses[0]
    assert first.PatientID == "P1" and str(first.PatientName) == "NAME^P1" and first.StudyDate == "20230101"
    assert first.AccessionNumber == "ACCP1" and first.RetrieveAETitle == "DRHPACS"
    assert list(first.ModalitiesInStudy) == ["DX"] or first.ModalitiesInStudy == "DX"
    assert int(first.NumberOfStudyRelatedInstances) == 2


def test_findscu_similar_by_private_key_with_filters(tmp_path, archive):
    keys = [
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID=",
        "ModalitiesInStudy=DX",
        "StudyDate=20220101-",
        "(0099,0010)=DRH-PACS 1",
        f"(0099,1001)={REF}",
        "(0099,1002)=5",
        "(0099,1007)=YES",  # exclude the reference patient: NEAR (P1) goes
    ]
    proc, responses = findscu(archive.port, keys, tmp_path / "rsp", called="DRHPACS")
    assert proc.returncode == 0, proc.stderr
    assert [uid for uid, *_ in _distances(responses)] == [MID], proc.stdout + proc.stderr

    # Implicit VR: the private keys are found by our dictionary, not by a VR on the wire.
    proc, responses = findscu(archive.port, keys, tmp_path / "rsp-implicit", called="DRHPACS", extra=("-xi",))
    assert [uid for uid, *_ in _distances(responses)] == [MID], proc.stdout + proc.stderr

    keys_k = ["QueryRetrieveLevel=STUDY", "(0099,0010)=DRH-PACS 1", f"(0099,1001)={REF}", "(0099,1002)=2"]
    keys_k.append("(0099,1003)=2")  # at most 2 bits apart
    _, responses = findscu(archive.port, keys_k, tmp_path / "rsp2", called="DRHPACS")
    assert [uid for uid, *_ in _distances(responses)] == [NEAR, OTHER_CT]


@pytest.mark.parametrize(
    ("reference", "needle"),
    [
        ("1.2.826.0.1.3680043.8.498.999", "unknown reference study"),
        (PENDING_STUDY, "not yet indexed"),
        ("1.2.3.*", "not a single valid UID"),
    ],
)
def test_findscu_similar_failures_carry_an_error_comment(tmp_path, archive, reference, needle):
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={reference}", "PatientID="]
    proc, responses = findscu(archive.port, keys, tmp_path / "rsp", called="SIMILAR", debug=True)
    output = proc.stdout + proc.stderr
    assert responses == []
    assert "Failed" in output or "Failure" in output or "Unable to Process" in output, output
    assert needle in output, output


def test_similar_failure_status_and_comment_seen_by_pynetdicom_scu(archive):
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="SIMILAR")
    assert assoc.is_established
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = PENDING_STUDY
        answers = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))
        assert len(answers) == 1
        status, identifier = answers[0]
        assert status.Status == st.UNABLE_TO_PROCESS and identifier is None
        assert "not yet indexed" in status.ErrorComment
        ds.StudyInstanceUID = REF  # the association carries on
        answers = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))
        assert [a[0].Status for a in answers] == [st.PENDING] * 4 + [st.SUCCESS]
    finally:
        assoc.release()


def test_index_not_ready_is_a_failure_not_an_empty_success(tmp_path, plugin):
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={REF}"]
    proc, responses = findscu(plugin.port, keys, tmp_path / "rsp", called="SIMILAR", debug=True)
    assert responses == []
    assert "index not ready" in proc.stdout + proc.stderr


def test_image_level_similar_by_sop_instance_uid(tmp_path, plugin):
    study_a, study_b = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(3)]
    plugin.store.records.put_study(study_a, _meta("P1", "20240101"))
    plugin.store.records.put_study(study_b, _meta("P2", "20240101"))
    for sop, study in zip(sops, (study_a, study_b, study_b), strict=True):
        plugin.store.records.put_instance(
            sop, study, {"series_uid": "1.2.3", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1"}
        )
    populate(
        plugin.store,
        {sops[0]: (code("0" * 16), {}), sops[1]: (code("0" * 15 + "1"), {}), sops[2]: (code("1" * 16), {})},
        level="image",
    )
    keys = ["QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={sops[0]}", "StudyInstanceUID=", "PatientID="]
    proc, responses = findscu(plugin.port, keys, tmp_path / "rsp", called="SIMILAR")
    assert proc.returncode == 0, proc.stderr
    assert [str(r.SOPInstanceUID) for r in responses] == [sops[1], sops[2]]
    assert [str(r.StudyInstanceUID) for r in responses] == [study_b, study_b]
    assert responses[0].PatientID == "P2"


# -- plain Query/Retrieve ----------------------------------------------------------------------------
def test_plain_study_root_and_patient_root_find(tmp_path, archive):
    keys = ["QueryRetrieveLevel=STUDY", "PatientID=P1", "StudyInstanceUID=", "StudyDate="]
    proc, responses = findscu(archive.port, keys, tmp_path / "a", called="DRHPACS")
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(r.StudyInstanceUID) for r in responses) == sorted([REF, NEAR])

    keys = ["QueryRetrieveLevel=STUDY", "StudyDate=20240101-", "ModalitiesInStudy=CT", "StudyInstanceUID="]
    _, responses = findscu(archive.port, keys, tmp_path / "b", called="DRHPACS")
    assert [str(r.StudyInstanceUID) for r in responses] == [OTHER_CT]

    keys = ["QueryRetrieveLevel=PATIENT", "PatientID=P1", "PatientName=", "NumberOfPatientRelatedStudies="]
    proc, responses = findscu(archive.port, keys, tmp_path / "c", called="DRHPACS", model="-P")
    assert proc.returncode == 0, proc.stderr
    assert len(responses) == 1 and int(responses[0].NumberOfPatientRelatedStudies) == 2


def test_cancel_stops_a_long_answer(archive):
    """C-CANCEL during a plain answer: the SCP stops with Cancel instead of sending everything.

    The handler produces responses only as the peer takes them (back-pressure on the send queue),
    so the C-CANCEL sent after the third response arrives while most of the answer is still unmade.
    """
    total = 300
    for n in range(total):
        archive.store.records.put_study(f"1.2.826.0.1.3680043.8.498.9{n:04d}", _meta("PX", "20200101"))
    ae = AE(ae_title="VIEWER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", archive.port, ae_title="DRHPACS")
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = "PX"
        ds.StudyInstanceUID = ""
        statuses = []
        started = time.monotonic()
        for n, (status, _) in enumerate(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind, msg_id=7)):
            statuses.append(status.Status)
            if n == 2:
                assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelFind)
        assert statuses[-1] == st.CANCEL
        assert len(statuses) < total
        assert time.monotonic() - started < 60
    finally:
        assoc.release()


# -- transport: TLS and the association limit -------------------------------------------------------------
def test_tls_with_client_certificates(tmp_path, redis_client, redis_server):
    certs = certificates(tmp_path / "certs")
    overrides = {
        "tls_cert": str(certs["server.crt"]),
        "tls_key": str(certs["server.key"]),
        "tls_ca": str(certs["ca.crt"]),
    }
    with running_plugin(tmp_path, redis_server.url, **overrides) as running:
        port = str(running.port)
        tls = ["+tls", str(certs["client.key"]), str(certs["client.crt"]), "+cf", str(certs["ca.crt"])]
        ok = dcmtk("echoscu", *tls, "-aec", "DRHPACS", "127.0.0.1", port)
        assert ok.returncode == 0, ok.stderr
        plain = dcmtk("echoscu", "-aec", "DRHPACS", "127.0.0.1", port, timeout=30)
        assert plain.returncode != 0
        anonymous = dcmtk("echoscu", "+tla", "+cf", str(certs["ca.crt"]), "-aec", "DRHPACS", "127.0.0.1", port)
        assert anonymous.returncode != 0  # no client certificate: refused


def test_association_limit(tmp_path, redis_client, redis_server):
    with running_plugin(tmp_path, redis_server.url, max_associations=1) as running:
        _, first = _scu(running.port)
        try:
            ae = AE(ae_title="STORESCU")
            ae.add_requested_context(DigitalXRayImageStorageForPresentation)
            second = ae.associate("127.0.0.1", running.port, ae_title="DRHPACS")
            assert second.is_rejected
        finally:
            first.release()

        def slot_free_again() -> bool:
            assoc = ae.associate("127.0.0.1", running.port, ae_title="DRHPACS")
            if assoc.is_established:
                assoc.release()
                return True
            return False

        wait_until(slot_free_again, 10, what="the association slot to be free again")


def test_broker_down_file_is_answered_after_spooling_and_queued_when_the_broker_returns(
    tmp_path, redis_client, redis_server
):
    """Redis as broker is down: the C-STORE still succeeds (the file is durable), the task waits."""
    import redis as redis_lib

    from plugin.core.redis_server import EmbeddedRedis, free_port

    broker_port = free_port()
    study = make_study(tmp_path / "in", fixture_images()[5:6], patient_id="P-BROKER")
    broker_url = f"redis://127.0.0.1:{broker_port}/0"
    with running_plugin(tmp_path, redis_server.url, broker_url=broker_url) as running:
        proc = dcmtk("storescu", "-aec", "DRHPACS", "127.0.0.1", str(running.port), str(study.files[0]))
        assert proc.returncode == 0, proc.stderr
        assert (running.settings.spool_dir / study.study_uid / f"{study.sop_uids[0]}.dcm").exists()
        reconciler = running.server.reconciler
        wait_until(lambda: reconciler.pending == 1, 60, what="the failed enqueue to be handed to the reconciler")
        assert reconciler.run_once() == 0  # still down: nothing queued, nothing lost
        assert running.server.counters.snapshot()["spool_unqueued"] == 1  # shown by status and /metrics
        with EmbeddedRedis(tmp_path / "broker", port=broker_port):
            assert reconciler.run_once() == 1
            assert redis_lib.Redis(port=broker_port).llen("ingest") == 1
        assert running.server.counters.snapshot()["spool_unqueued"] == 0


def test_accepted_connections_turn_nagle_off():
    """Without TCP_NODELAY each C-FIND response waited for a delayed ACK (~40 ms per message)."""
    import socket
    from types import SimpleNamespace

    from plugin.dicom.handlers import handle_conn_open

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            event = SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=accepted))))
            handle_conn_open(event)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_truncated_rle_and_dropped_non_images_are_told_apart_and_counted(tmp_path, plugin, redis_client):
    """A truncated RLE file is refused as truncated (it was once "missing UID"); an accepted
    non-image object is counted with the ignored instances, so nothing is dropped silently."""
    study = make_study(tmp_path / "in", fixture_images()[:1], rle=True)
    data = study.files[0].read_bytes()
    cut = tmp_path / "cut-rle.dcm"
    cut.write_bytes(data[: len(data) - 3000])
    _, assoc = _scu(plugin.port)
    try:
        ae_rle = AE(ae_title="STORESCU")
        ae_rle.add_requested_context(DigitalXRayImageStorageForPresentation, [RLELossless])
        rle_assoc = ae_rle.associate("127.0.0.1", plugin.port, ae_title="DRHPACS")
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, unread
        try:
            status = rle_assoc.send_c_store(cut)
            assert status.Status == st.STORE_CANNOT_UNDERSTAND
            assert "truncated" in status.ErrorComment, status.ErrorComment
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = False
            rle_assoc.release()
        sr = Dataset()
        sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
        sr.SOPInstanceUID = generate_uid()
        sr.StudyInstanceUID = generate_uid()
        sr.SeriesInstanceUID = generate_uid()
        sr.file_meta = FileMetaDataset()
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert assoc.send_c_store(sr).Status == st.SUCCESS
    finally:
        assoc.release()
    ignored = wait_until(lambda: plugin.store.ledger.ignored_count(), 10, what="the SR counted as ignored")
    assert ignored == 1
