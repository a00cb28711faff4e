"""C-FIND identifiers in, similar/plain queries and answers out (plugin.dicom.similar, plugin.dicom.plain,
plugin.search.query), without a network."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from plugin.dicom import plain, similar
from plugin.dicom import status as st
from plugin.search import query as search
from plugin.search.errors import QueryError
from plugin.search.filters import parse_date_range

SIMILAR = "SIMILAR"
REF = "1.2.826.0.1.3680043.8.498.1"


def identifier(level: str = "STUDY", **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def with_private(ds: Dataset, block: int = 0x10, **values: str) -> Dataset:
    """Our private block at ``block``, values as UN bytes: what a viewer without our dictionary sends."""
    offsets = {"ref": st.REFERENCE_UID, "k": st.NUMBER_OF_RESULTS, "maxd": st.MAX_DISTANCE}
    offsets["exclude"] = st.EXCLUDE_REFERENCE_PATIENT
    ds.add_new((st.PRIVATE_GROUP << 16) | block, "LO", st.PRIVATE_CREATOR)
    for name, value in values.items():
        offset = offsets[name]
        raw = value.encode()
        ds.add_new(st.private_tag(offset, block), "UN", raw + b" " * (len(raw) % 2))
    return ds


# -- similar: parsing --------------------------------------------------------------------------------
def test_similar_ae_reads_study_uid_as_reference_with_filters():
    ds = identifier(
        StudyInstanceUID=REF,
        ModalitiesInStudy=["CT", "MR"],
        StudyDate="20200101-20231231",
        BodyPartExamined="CHEST",
        PatientID="",
        PatientName="",
    )
    assert similar.is_similar_request(ds, SIMILAR, SIMILAR)
    query = similar.parse_similar(ds, SIMILAR, SIMILAR, default_results=7)
    assert query.level == "STUDY" and query.reference_uid == REF and query.k == 7
    f = query.filters
    assert f.modalities == ("CT", "MR")
    assert (f.date_from, f.date_to) == ("20200101", "20231231")
    assert f.body_part == "CHEST" and f.patient_id is None and not f.exclude_reference_patient
    assert "PatientName" in similar.requested_keys(ds)


def test_accession_number_names_the_reference_and_its_patient_id_is_not_a_filter():
    asked = []

    def resolve(accession: str, patient_id: str | None) -> str:
        asked.append((accession, patient_id))
        return REF

    ds = identifier(StudyInstanceUID="", AccessionNumber="A1", PatientID="P9", ModalitiesInStudy="DX")
    query = similar.parse_similar(ds, SIMILAR, SIMILAR, 10, resolve_accession=resolve)
    assert query.reference_uid == REF and asked == [("A1", "P9")]
    assert query.filters.patient_id is None and query.filters.modalities == ("DX",)
    # a StudyInstanceUID wins over the accession; PatientID is then the usual filter
    query = similar.parse_similar(
        identifier(StudyInstanceUID=REF, AccessionNumber="A1", PatientID="P9"), SIMILAR, SIMILAR, 10, resolve
    )
    assert asked == [("A1", "P9")] and query.filters.patient_id == "P9"
    for bad in ("A*", "A1\\A2"):
        with pytest.raises(QueryError, match="AccessionNumber must name one study"):
            similar.parse_similar(identifier(AccessionNumber=bad), SIMILAR, SIMILAR, 10, resolve)


@pytest.mark.parametrize(
    ("ds", "is_similar"),
    [
        (identifier("STUDY", StudyInstanceUID=REF), True),
        (identifier("IMAGE", SOPInstanceUID=REF), True),
        (identifier("SERIES", StudyInstanceUID=REF, SeriesInstanceUID=""), False),
        (identifier("IMAGE", StudyInstanceUID=REF, SeriesInstanceUID="1.2.3", SOPInstanceUID=""), False),
        (identifier("PATIENT", PatientID="P1"), False),
    ],
)
def test_drill_down_on_the_similar_title_is_a_plain_query(ds, is_similar):
    assert similar.is_similar_request(ds, SIMILAR, SIMILAR) is is_similar


def test_private_key_works_on_any_ae_in_any_block():
    ds = with_private(identifier(StudyInstanceUID=""), block=0x42, ref=REF, k="3", maxd="12", exclude="YES")
    assert similar.is_similar_request(ds, "DRHPACS", SIMILAR)
    query = similar.parse_similar(ds, "DRHPACS", SIMILAR, default_results=10)
    assert (query.reference_uid, query.k, query.max_distance) == (REF, 3, 12)
    assert query.filters.exclude_reference_patient


def test_private_values_that_arrive_as_un_bytes_are_read():
    ds = identifier(StudyInstanceUID="")
    ds.add_new((st.PRIVATE_GROUP << 16) | 0x10, "LO", st.PRIVATE_CREATOR)
    ds.add_new(st.private_tag(st.REFERENCE_UID), "UN", (REF + "\x00").encode())
    ds.add_new(st.private_tag(st.NUMBER_OF_RESULTS), "UN", b"5 ")
    query = similar.parse_similar(ds, "DRHPACS", SIMILAR, default_results=10)
    assert (query.reference_uid, query.k) == (REF, 5)
    # a number DCMTK encoded without our dictionary (US, not text): refused, not read as "no k"
    ds[st.private_tag(st.NUMBER_OF_RESULTS)].value = (500).to_bytes(2, "little")
    with pytest.raises(QueryError, match="binary: load drh-pacs's dictionary") as info:
        similar.parse_similar(ds, "DRHPACS", SIMILAR, default_results=10)
    assert len(info.value.comment) <= 64
    ds[st.private_tag(st.NUMBER_OF_RESULTS)].value = b"\x00\x00"
    with pytest.raises(QueryError, match="binary"):
        similar.parse_similar(ds, "DRHPACS", SIMILAR, default_results=10)


def test_plain_query_on_our_ae_is_not_similar():
    assert not similar.is_similar_request(identifier(StudyInstanceUID=REF), "DRHPACS", SIMILAR)


def test_columns_a_viewer_asks_back_are_not_filters():
    """Empty or "*" in PatientName, StudyDescription... is how a viewer asks for those columns."""
    ds = identifier(
        StudyInstanceUID=REF, PatientName="*", PatientBirthDate="", StudyDescription="", StudyTime="", StudyID="*"
    )
    query = similar.parse_similar(ds, SIMILAR, SIMILAR, default_results=10)
    assert query.reference_uid == REF and not query.filters.restricts()


def test_image_level_reads_sop_instance_uid():
    ds = identifier("IMAGE", StudyInstanceUID="", SOPInstanceUID=REF, Modality="DX")
    query = similar.parse_similar(ds, SIMILAR, SIMILAR, default_results=10)
    assert query.level == "IMAGE" and query.reference_uid == REF and query.filters.modalities == ("DX",)


def test_a_number_of_results_over_the_maximum_is_refused_not_cut():
    with pytest.raises(QueryError, match=f"over the maximum of {search.MAX_RESULTS}"):
        similar.parse_similar(with_private(identifier(), ref=REF, k="999999999"), "X", SIMILAR, 10)
    query = similar.parse_similar(with_private(identifier(), ref=REF, k="150"), "X", SIMILAR, 10)
    with pytest.raises(QueryError, match="k=150 is over the maximum of 100"):
        search.check_k(query, 100)
    search.check_k(query, 150)  # at the maximum: fine


@pytest.mark.parametrize(
    ("ds", "needle"),
    [
        (identifier(StudyInstanceUID=""), "no reference"),
        (identifier(StudyInstanceUID="1.2.*"), "not a single valid UID"),
        (identifier(StudyInstanceUID=f"{REF}\\1.2.3"), "not a single valid UID"),
        (identifier(StudyInstanceUID="1.02.abc"), "not a single valid UID"),
        (identifier("SERIES", StudyInstanceUID=REF), "similar is STUDY or IMAGE"),
        (identifier("", StudyInstanceUID=REF), "similar is STUDY or IMAGE"),
        (identifier(StudyInstanceUID=REF, StudyDate="2020-01-01"), "StudyDate"),
        (identifier(StudyInstanceUID=REF, StudyDate="20240101-20230101"), "ends before"),
        (identifier(StudyInstanceUID=REF, StudyDate="20201345"), "not a date"),
        (identifier(StudyInstanceUID=REF, StudyDate="20200101-20190230"), "StudyDate range"),
        (identifier(StudyInstanceUID=REF, PatientID="PAT*"), "wildcards in PatientID"),
        (identifier(StudyInstanceUID=REF, PatientName="DOE*"), "PatientName is not a filter"),
        (identifier(StudyInstanceUID=REF, StudyDescription="CHEST"), "StudyDescription is not a filter"),
        (identifier("IMAGE", SOPInstanceUID=REF, AccessionNumber="A1"), "AccessionNumber is not a filter"),
        (with_private(identifier(), ref=REF, k="0"), "number of results must be >= 1"),
        (with_private(identifier(), ref=REF, k="ten"), "not an integer"),
        (with_private(identifier(), ref=REF, maxd="-1"), "maximum distance"),
        (with_private(identifier(), ref=REF, exclude="MAYBE"), "exclude reference patient"),
    ],
)
def test_malformed_similar_identifiers_say_what_is_wrong(ds, needle):
    with pytest.raises(QueryError) as info:
        similar.parse_similar(ds, SIMILAR, SIMILAR, default_results=10)
    assert info.value.reason == "malformed"
    assert needle in info.value.comment
    assert similar.failure_status(info.value) == st.UNABLE_TO_PROCESS
    assert len(info.value.comment) <= 64  # ErrorComment is LO


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20240115", ("20240115", "20240115")),
        ("20240101-", ("20240101", None)),
        ("-20240101", (None, "20240101")),
        ("20230101-20240101", ("20230101", "20240101")),
        ("", (None, None)),
    ],
)
def test_date_ranges(text, expected):
    assert parse_date_range(text) == expected


# -- similar: running against an index -----------------------------------------------------------------
class _Hit:
    def __init__(self, uid: str, distance: int) -> None:
        self.uid, self.distance, self.similarity = uid, distance, None


class _Index:
    """A stand-in replica for this one function's unit test (the real one is tested elsewhere)."""

    def __init__(self, codes: dict[str, bytes], ready: bool = True) -> None:
        self.codes, self.ready, self.nbits, self.version = codes, ready, 16, "v-test"
        self.calls: list[dict] = []

    def refresh(self, wait: float | None = None) -> None:
        pass

    def lookup(self, uid: str):
        code = self.codes.get(uid)
        return None if code is None else (code, np.zeros(16, np.int8))

    def search(self, code, k, *, max_distance=None, filters=None, exclude_patient=None, exclude_uids=(), rerank=None):
        self.calls.append(
            {
                "k": k,
                "max_distance": max_distance,
                "filters": filters,
                "patient": exclude_patient,
                "exclude": exclude_uids,
            }
        )
        hits = sorted(
            (
                _Hit(uid, bin(int.from_bytes(c, "big") ^ int.from_bytes(code, "big")).count("1"))
                for uid, c in self.codes.items()
            ),
            key=lambda h: (h.distance, h.uid),
        )
        return hits[:k]  # deliberately does not exclude: run_similar must


@pytest.fixture
def store(redis_client):
    from plugin.store import Store

    return Store(redis_client, "drh")


def test_run_similar_ranks_nearest_first_and_never_returns_the_reference(store):
    codes = {REF: b"\x00\x00", "1.2.3.10": b"\x00\x07", "1.2.3.11": b"\x00\x01", "1.2.3.12": b"\xff\xff"}
    for n, uid in enumerate(codes):
        store.records.put_study(uid, {"patient_id": f"P{n}", "modalities": "CT,MR"})
    store.records.put_instance("1.2.3.11.1", "1.2.3.11", {})
    index = _Index(codes)
    query = similar.parse_similar(
        with_private(identifier(), ref=REF, k="3", exclude="YES"), "X", SIMILAR, default_results=10
    )
    results = search.run_similar(query, store, {"study": index, "image": index})
    assert [r.uid for r in results] == ["1.2.3.11", "1.2.3.10"]  # k=3 asked, the reference dropped
    assert [r.rank for r in results] == [1, 2]
    assert [r.distance for r in results] == [1, 3]
    assert results[0].score == pytest.approx(1 - 1 / 16, abs=1e-4)
    assert results[0].study["patient_id"] == "P2" and results[0].study["n_instances"] == "1"
    call = index.calls[0]
    assert call["exclude"] == (REF,) and call["patient"] == "P0"


def test_run_similar_failures_name_the_reason(store):
    index = _Index({REF: b"\x00\x00"})
    store.records.put_study("1.2.3.4", {"patient_id": "P"})

    def run(uid: str, idx: _Index) -> QueryError:
        query = similar.parse_similar(identifier(StudyInstanceUID=uid), SIMILAR, SIMILAR, 10)
        with pytest.raises(QueryError) as info:
            search.run_similar(query, store, {"study": idx, "image": idx})
        return info.value

    assert run("1.2.3.4", index).reason == "not-indexed"  # metadata known, no study code yet
    assert "not yet indexed" in run("1.2.3.4", index).comment
    assert run("1.2.3.999", index).reason == "unknown-reference"
    # received, and none of it indexed: said so, unless some of it is still on its way to the model
    store.records.note_unindexed("1.2.3.5", "1.2.3.5.1", "failed")
    store.ingest.hint({"sop_uid": "1.2.3.5.2", "study_uid": "1.2.3.5", "path": "p", "received_at": 1.0})
    assert run("1.2.3.5", index).reason == "not-indexed"
    store.ingest.done("1.2.3.5.2", "1.2.3.5")
    store.records.note_unindexed("1.2.3.5", "1.2.3.5.2", "ignored")
    refused = run("1.2.3.5", index)
    assert refused.reason == "not-indexable"
    assert refused.comment == "reference study received, none indexed: 1 failed, 1 non-image"
    store.records.put_instance("1.2.3.5.1", "1.2.3.5", {"modality": "DX"})  # the failed one, indexed after a retry
    assert store.records.unindexed("1.2.3.5") == {"ignored": 1}
    not_ready = run(REF, _Index({REF: b"\x00\x00"}, ready=False))
    assert not_ready.reason == "index-not-ready" and similar.failure_status(not_ready) == st.OUT_OF_RESOURCES


def test_similar_answer_carries_return_keys_and_private_rank_distance_score():
    ds = identifier(StudyInstanceUID=REF, StudyID="")
    query = similar.parse_similar(ds, SIMILAR, SIMILAR, 10)
    study = {
        "patient_id": "PID9",
        "patient_name": "Müller^Anna",
        "study_date": "20240115",
        "study_description": "CHEST PA",
        "accession_number": "A1",
        "modalities": "CR,DX",
        "n_instances": "2",
    }
    result = search.SimilarResult(rank=1, uid="1.2.3.9", distance=4, score=0.9375, study_uid="1.2.3.9", study=study)
    ds = similar.similar_answer(result, query, similar.requested_keys(ds), "DRHPACS", "v1", route="chest-xr")
    assert ds.StudyInstanceUID == "1.2.3.9" and ds.PatientID == "PID9"
    assert list(ds.ModalitiesInStudy) == ["CR", "DX"] and ds.NumberOfStudyRelatedInstances == 2
    assert ds.RetrieveAETitle == "DRHPACS" and ds.SpecificCharacterSet == "ISO_IR 192"
    assert "StudyID" in ds and ds.StudyID == ""  # asked for, not known: present and empty
    assert st.private_text(ds, st.RANK) == "1"
    assert st.private_text(ds, st.DISTANCE) == "4"
    assert st.private_text(ds, st.SCORE) == "0.9375"
    assert st.private_text(ds, st.REFERENCE_UID) == REF
    assert st.private_text(ds, st.MODEL_VERSION) == "v1"
    assert st.private_text(ds, st.MODEL_ROUTE) == "chest-xr"


# -- plain matching ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keyword", "candidate", "pattern", "expected"),
    [
        ("PatientName", "DOE^JOHN", "doe*", True),
        ("PatientName", "DOE^JOHN", "SMITH*", False),
        ("PatientID", "AB12", "A?12", True),
        ("PatientID", "AB12", "AB1", False),
        ("StudyInstanceUID", "1.2.3", "1.2.4\\1.2.3", True),
        ("StudyInstanceUID", "1.2.3", "1.2.4", False),
        ("StudyDate", "20240115", "20240101-20240131", True),
        ("StudyDate", "20240215", "20240101-20240131", False),
        ("StudyDate", "20240215", "20240201-", True),
        ("StudyDate", "", "20240201-", False),
        ("ModalitiesInStudy", ["CR", "DX"], "DX", True),
        ("ModalitiesInStudy", ["CR", "DX"], "CT\\MR", False),
        ("AccessionNumber", "A[1]", "A[1]", True),
    ],
)
def test_match_value(keyword, candidate, pattern, expected):
    assert plain.match_value(keyword, candidate, pattern) is expected


def _archive() -> list[tuple[str, dict[str, str], list[dict[str, str]]]]:
    def inst(sop: str, series: str, number: str) -> dict[str, str]:
        return {"sop_uid": sop, "series_uid": series, "modality": "DX", "series_number": "1", "instance_number": number}

    return [
        (
            "1.1",
            {"patient_id": "P1", "patient_name": "ONE^A", "study_date": "20240101", "modalities": "DX"},
            [inst("1.1.1.1", "1.1.1", "1"), inst("1.1.1.2", "1.1.1", "2")],
        ),
        (
            "1.2",
            {"patient_id": "P1", "patient_name": "ONE^A", "study_date": "20240301", "modalities": "CT"},
            [inst("1.2.1.1", "1.2.1", "1")],
        ),
        ("1.3", {"patient_id": "P2", "patient_name": "TWO^B", "study_date": "20230101", "modalities": "DX"}, []),
    ]


def test_plain_study_level_matching_and_answer():
    query = plain.parse_plain(identifier(PatientID="P1", StudyDate="20240201-", PatientName="", StudyInstanceUID=""))
    records = list(plain.iter_plain(query, _archive()))
    assert [r["StudyInstanceUID"] for r in records] == ["1.2"]
    ds = plain.plain_answer(records[0], query, "DRHPACS")
    assert ds.StudyInstanceUID == "1.2" and ds.PatientName == "ONE^A" and ds.RetrieveAETitle == "DRHPACS"
    assert "StudyTime" not in ds  # only what was asked, plus the unique key


def test_plain_series_and_image_levels():
    series = plain.parse_plain(identifier("SERIES", StudyInstanceUID="1.1", SeriesInstanceUID="", Modality=""))
    rows = list(plain.iter_plain(series, _archive()))
    assert [(r["SeriesInstanceUID"], r["NumberOfSeriesRelatedInstances"]) for r in rows] == [("1.1.1", "2")]
    image = plain.parse_plain(identifier("IMAGE", StudyInstanceUID="1.1", SOPInstanceUID="1.1.1.2"))
    rows = list(plain.iter_plain(image, _archive()))
    assert [r["SOPInstanceUID"] for r in rows] == ["1.1.1.2"]


def test_patient_root_patient_level_groups_studies():
    query = plain.parse_plain(identifier("PATIENT", PatientID="", NumberOfPatientRelatedStudies=""), model="patient")
    rows = {r["PatientID"]: r for r in plain.iter_plain(query, _archive())}
    assert rows["P1"]["NumberOfPatientRelatedStudies"] == "2" and rows["P2"]["NumberOfPatientRelatedStudies"] == "1"


def test_plain_malformed_identifiers():
    with pytest.raises(QueryError, match="PATIENT"):
        plain.parse_plain(identifier("PATIENT"), model="study")
    with pytest.raises(QueryError, match="UID"):
        plain.parse_plain(identifier(StudyInstanceUID="1.2.*"))
    with pytest.raises(QueryError, match="StudyDate"):
        plain.parse_plain(identifier(StudyDate="yesterday"))


def test_an_accession_number_names_its_study_and_patient_id_tells_duplicates_apart(store):
    store.records.put_study("1.2.5.1", {"accession_number": "ACC7", "patient_id": "P1"})
    store.records.put_study("1.2.5.2", {"accession_number": "ACC8", "patient_id": "P1"})
    assert search.study_by_accession(store, "ACC7") == "1.2.5.1"
    store.records.put_study("1.2.5.3", {"accession_number": "ACC7", "patient_id": "P2"})  # another issuer's
    with pytest.raises(QueryError) as info:
        search.study_by_accession(store, "ACC7")
    assert info.value.reason == "ambiguous-reference" and len(info.value.comment) <= 64
    assert search.study_by_accession(store, "ACC7", patient_id="P2") == "1.2.5.3"
    with pytest.raises(QueryError) as info:  # the number exists: it is the PatientID that matches none
        search.study_by_accession(store, "ACC7", patient_id="NOPE")
    assert info.value.comment == "no study with that accession number and that PatientID"
    assert len(info.value.comment) <= 64
    store.records.put_study("1.2.5.3", {"accession_number": "ACC9"})  # corrected: the old number no longer names it
    assert search.study_by_accession(store, "ACC7") == "1.2.5.1"
    store.delete_study("1.2.5.1")
    with pytest.raises(QueryError, match="no study"):
        search.study_by_accession(store, "ACC7")
