"""What a DICOM viewer's Q/R dialog does against the SIMILAR title, with DCMTK as the viewer.

Viewer forms name a study by its AccessionNumber (they have no StudyInstanceUID field), browse a
returned study at SERIES and IMAGE level, re-sort the answers by their own columns, and pull the
images with C-GET. Codes and records are written through the store as the workers would, so no
model runs here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from plugin.dicom import status as st
from plugin.dicom.similar import ranked_description
from tests.helpers.dicomgen import fixture_images, make_study
from tests.helpers.peers import code, dcmtk, findscu, populate, running_plugin

pytestmark = pytest.mark.slow  # real DICOM peers, Orthanc, workers or deployment tools

REF, NEAR, MID, FAR = (f"1.2.826.0.1.3680043.8.498.20{n}" for n in range(4))
SERIES = {uid: uid + ".1" for uid in (REF, NEAR, MID, FAR)}


def _meta(pid: str, accession: str, description: str = "CHEST PA") -> dict[str, str]:
    return {
        "patient_id": pid,
        "patient_name": f"NAME^{pid}",
        "study_date": "20240101",
        "study_description": description,
        "accession_number": accession,
        "modalities": "DX",
        "n_instances": "2",
    }


@pytest.fixture
def archive(tmp_path, redis_client, redis_server):
    """Four indexed studies (two instances each, one series); MID shares its accession number with FAR."""
    with running_plugin(tmp_path, redis_server.url, allowed_calling_aes=["VIEWER"]) as plugin:
        populate(
            plugin.store,
            {
                REF: (code("0000 0000 0000 0000"), _meta("P1", "A-REF", "CHEST AP")),
                NEAR: (code("0000 0000 0000 0001"), _meta("P2", "A-NEAR")),
                MID: (code("0000 0000 0000 0111"), _meta("P3", "A-DUP")),
                FAR: (code("1111 1111 0000 0000"), _meta("P4", "A-DUP")),
            },
        )
        for study, series in SERIES.items():
            for n in (1, 2):
                plugin.store.records.put_instance(
                    f"{series}.{n}",
                    study,
                    {
                        "series_uid": series,
                        "modality": "DX",
                        "series_number": "1",
                        "instance_number": str(n),
                        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1",
                    },
                )
        yield plugin


def _ranks(responses) -> list[tuple[str, int]]:
    return [(str(r.StudyInstanceUID), int(st.private_text(r, st.RANK))) for r in responses]


def test_accession_number_names_the_reference(tmp_path, archive):
    keys = ["QueryRetrieveLevel=STUDY", "AccessionNumber=A-REF", "StudyInstanceUID=", "PatientName="]
    proc, responses = findscu(archive.port, keys, tmp_path / "a", called="SIMILAR")
    assert proc.returncode == 0, proc.stderr
    assert _ranks(responses) == [(NEAR, 1), (MID, 2), (FAR, 3)]

    # With the PatientID of the reference: it says whose accession it is, it does not filter to that patient.
    keys = ["QueryRetrieveLevel=STUDY", "AccessionNumber=A-REF", "PatientID=P1", "StudyInstanceUID="]
    _, responses = findscu(archive.port, keys, tmp_path / "b", called="SIMILAR")
    assert _ranks(responses) == [(NEAR, 1), (MID, 2), (FAR, 3)]


def test_an_ambiguous_accession_asks_for_the_patient_id(tmp_path, archive):
    keys = ["QueryRetrieveLevel=STUDY", "AccessionNumber=A-DUP", "StudyInstanceUID="]
    proc, responses = findscu(archive.port, keys, tmp_path / "a", called="SIMILAR", debug=True)
    assert responses == []
    assert "0xc000" in (proc.stdout + proc.stderr).lower()
    assert "add PatientID" in proc.stdout + proc.stderr

    keys = ["QueryRetrieveLevel=STUDY", "AccessionNumber=A-DUP", "PatientID=P4", "StudyInstanceUID="]
    _, responses = findscu(archive.port, keys, tmp_path / "b", called="SIMILAR")
    assert _ranks(responses) == [(REF, 1), (NEAR, 2), (MID, 3)]  # FAR is the reference: 8, 9 and 11 bits away

    keys = ["QueryRetrieveLevel=STUDY", "AccessionNumber=NO-SUCH", "StudyInstanceUID="]
    proc, responses = findscu(archive.port, keys, tmp_path / "c", called="SIMILAR", debug=True)
    assert responses == [] and "no study with that accession number" in proc.stdout + proc.stderr


def test_rank_and_score_lead_the_study_description_so_a_re_sort_keeps_the_order(tmp_path, archive):
    keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={REF}", "StudyDescription="]
    _, responses = findscu(archive.port, keys, tmp_path / "a", called="SIMILAR")
    descriptions = [str(r.StudyDescription) for r in responses]
    assert descriptions[0] == "#01 0.938 CHEST PA"  # k=10 by default: two digits; 1 - 1/16
    assert sorted(descriptions) == descriptions  # a viewer sorting by description keeps the similarity order
    assert ranked_description(3, 0.5, 100, "X" * 80) == "#003 0.500 " + "X" * 53  # within LO's 64


def test_series_and_image_drill_down_on_the_similar_title(tmp_path, archive):
    series_keys = ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={NEAR}", "SeriesInstanceUID=", "Modality="]
    plain = {}
    for called in ("SIMILAR", "DRHPACS"):
        proc, responses = findscu(archive.port, series_keys, tmp_path / f"s-{called}", called=called)
        assert proc.returncode == 0, proc.stderr
        plain[called] = [(str(r.SeriesInstanceUID), r.Modality) for r in responses]
    assert plain["SIMILAR"] == plain["DRHPACS"] == [(SERIES[NEAR], "DX")]

    image_keys = [
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={NEAR}",
        f"SeriesInstanceUID={SERIES[NEAR]}",
        "SOPInstanceUID=",
        "InstanceNumber=",
    ]
    proc, responses = findscu(archive.port, image_keys, tmp_path / "i", called="SIMILAR")
    assert proc.returncode == 0, proc.stderr
    assert sorted(str(r.SOPInstanceUID) for r in responses) == [f"{SERIES[NEAR]}.1", f"{SERIES[NEAR]}.2"]


def _getscu(port: int, keys: list[str], out: Path, called: str = "DRHPACS", debug: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    args = ["-d" if debug else "-v", "-S", "-aet", "VIEWER", "-aec", called, "-od", str(out)]
    for key in keys:
        args += ["-k", key]
    return dcmtk("getscu", *args, "127.0.0.1", str(port))


def test_c_get_study_series_and_instance_from_the_spool(tmp_path, redis_client, redis_server):
    images = fixture_images()
    study = make_study(tmp_path / "in", images[0:2], patient_id="P-GET")
    compressed = make_study(tmp_path / "in", images[2:3], patient_id="P-GET2", rle=True)
    with running_plugin(tmp_path, redis_server.url, allowed_calling_aes=["VIEWER", "PACS"]) as plugin:
        for files, syntax in ((study.files, "-xe"), (compressed.files, "-xr")):  # the RLE file stays RLE
            sent = dcmtk("storescu", "-aet", "PACS", "-aec", "DRHPACS", syntax, "127.0.0.1", str(plugin.port), *files)
            assert sent.returncode == 0, sent.stderr
        series_uid = str(dcmread(study.files[0], stop_before_pixels=True).SeriesInstanceUID)

        whole = _getscu(
            plugin.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_uid}"], tmp_path / "s"
        )
        assert whole.returncode == 0, whole.stderr
        got = {dcmread(p).SOPInstanceUID: dcmread(p) for p in (tmp_path / "s").glob("*") if p.is_file()}
        assert set(got) == set(study.sop_uids)
        original = dcmread(study.files[0])
        assert got[original.SOPInstanceUID].PixelData == original.PixelData  # the same pixels, not a rendering

        series = _getscu(
            plugin.port,
            ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study.study_uid}", f"SeriesInstanceUID={series_uid}"],
            tmp_path / "se",
            called="SIMILAR",  # a viewer that keeps the similar title for retrieval gets the same
        )
        assert series.returncode == 0, series.stderr
        assert len([p for p in (tmp_path / "se").glob("*") if p.is_file()]) == 2

        one = _getscu(
            plugin.port,
            [
                "QueryRetrieveLevel=IMAGE",
                f"StudyInstanceUID={compressed.study_uid}",
                f"SeriesInstanceUID={dcmread(compressed.files[0], stop_before_pixels=True).SeriesInstanceUID}",
                f"SOPInstanceUID={compressed.sop_uids[0]}",
            ],
            tmp_path / "i",
        )
        assert one.returncode == 0, one.stderr
        (path,) = [p for p in (tmp_path / "i").glob("*") if p.is_file()]
        assert dcmread(path).SOPInstanceUID == compressed.sop_uids[0]  # sent decompressed: every viewer reads it

        # Not here: a failure that says why (DCMTK then leaves the Failed SOP Instance UID List unread)
        missing = _getscu(
            plugin.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={generate_uid()}"], tmp_path / "m", debug=True
        )
        text = missing.stdout + missing.stderr
        assert "0xc000: Failed: Unable to process" in text and "no such study here" in text
        assert not [p for p in (tmp_path / "m").glob("*") if p.is_file()]
        # a study indexed without keeping its files: the failure says where to get it
        kept_nothing = generate_uid()
        plugin.store.records.put_study(kept_nothing, {"source_ae": "ORTHANC"})
        kept = _getscu(plugin.port, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={kept_nothing}"], tmp_path / "k",
                       debug=True)  # fmt: skip
        text = kept.stdout + kept.stderr
        assert "0xc000: Failed: Unable to process" in text and "no stored copy here" in text
