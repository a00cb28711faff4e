"""The similar-studies C-FIND over DICOM: identifier in, :class:`~plugin.search.query.SimilarQuery` out,
and each result back as a pending response.

Two ways to ask (SPEC "The similar-studies query over DICOM"):

1. the called AE title is ``Settings.similar_ae_title``: StudyInstanceUID (STUDY level) or
   SOPInstanceUID (IMAGE level) names the reference, it is not a filter;
2. any called AE title: our private block (creator ``DRH-PACS 1``) carries the reference UID, the
   number of results and an optional maximum Hamming distance.

Filters come from standard matching keys: ModalitiesInStudy, a StudyDate (range), BodyPartExamined,
PatientID (one patient's priors) and, in the private block, "exclude the reference patient". A value
in another key a query form fills in (PatientName, StudyDescription...: :data:`NOT_FILTERS`) is
refused with a reason rather than ignored.

Viewer forms rarely have a StudyInstanceUID field, so on the ``SIMILAR`` title a STUDY-level query
may name its reference by AccessionNumber instead (with PatientID when the number is not unique);
PatientID then says whose accession it is and is not a filter. SERIES and IMAGE queries that drill
down into a returned study (IMAGE with its SeriesInstanceUID) are plain queries on either title
(:func:`is_drill_down`).

Private elements do not survive every viewer (Orthanc drops their values, most lists hide them and
re-sort by their own columns), so each answer's StudyDescription also starts with the rank and the
score, ``#01 0.938 CHEST PA``: the one free-text study column every query list shows, and sorting by
it keeps the similarity order (see :func:`ranked_description`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

from pydicom.dataset import Dataset

from plugin.core.header import is_uid
from plugin.dicom import status as st
from plugin.search.errors import QueryError
from plugin.search.filters import Filters, parse_date_range
from plugin.search.query import SimilarQuery, SimilarResult, modalities_of

# Return keys of every similar answer at STUDY level (SPEC), in addition to what was asked.
STUDY_RETURN_KEYS = (
    "PatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "StudyDescription",
    "AccessionNumber",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)
IMAGE_RETURN_KEYS = ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "Modality")

# DICOM keyword -> field of the study record written by the workers (plugin.core.header).
STUDY_META_KEYS = {
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "StudyDescription": "study_description",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "ReferringPhysicianName": "referring_physician",
    "BodyPartExamined": "body_part",
}
INSTANCE_META_KEYS = {
    "SeriesInstanceUID": "series_uid",
    "SOPClassUID": "sop_class_uid",
    "Modality": "modality",
    "SeriesNumber": "series_number",
    "InstanceNumber": "instance_number",
}


def text(ds: Dataset, keyword: str) -> str:
    """A data element as stripped text; multi-valued elements joined with backslashes."""
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def requested_keys(ds: Dataset) -> tuple[str, ...]:
    """The standard keywords present in an identifier (echoed in answers, as the standard wants)."""
    out = []
    for elem in ds:
        if elem.tag.is_private or elem.tag.group == 0x0002:
            continue
        if elem.keyword:
            out.append(elem.keyword)
    return tuple(out)


def has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def is_drill_down(ds: Dataset) -> bool:
    """A query below STUDY level inside a known study: a viewer browsing a returned study.

    SERIES level always; IMAGE level when it names the series (hierarchical drill-down), which an
    image-to-image similar query never does (it names only the reference SOPInstanceUID). PATIENT
    level has no similar meaning either.
    """
    level = text(ds, "QueryRetrieveLevel").upper()
    return level in {"PATIENT", "SERIES"} or (level == "IMAGE" and bool(text(ds, "SeriesInstanceUID")))


def is_similar_request(ds: Dataset, called_ae: str, similar_ae_title: str) -> bool:
    """True when this C-FIND asks for similar studies rather than plain matching."""
    if st.private_text(ds, st.REFERENCE_UID) is not None:
        return True
    return called_ae.strip() == similar_ae_title.strip() and not is_drill_down(ds)


def _positive_int(value: str, what: str, minimum: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise QueryError("malformed", f"{what} {value!r} is not an integer") from None
    if number < minimum:
        raise QueryError("malformed", f"{what} must be >= {minimum}")
    return number


def _filters(ds: Dataset, level: str) -> Filters:
    exclude_text = (st.private_text(ds, st.EXCLUDE_REFERENCE_PATIENT) or "").upper()
    if exclude_text not in {"", "YES", "Y", "TRUE", "1", "NO", "N", "FALSE", "0"}:
        raise QueryError("malformed", f"exclude reference patient {exclude_text!r} is not YES or NO")
    modalities_text = text(ds, "ModalitiesInStudy")
    if level == "IMAGE" and not modalities_text:
        modalities_text = text(ds, "Modality")
    modalities = tuple(m.strip().upper() for m in modalities_text.split("\\") if m.strip() and m.strip() != "*")
    if any(has_wildcard(m) for m in modalities):
        raise QueryError("malformed", "wildcards in ModalitiesInStudy are not supported here")
    date_from, date_to = parse_date_range(text(ds, "StudyDate"))
    body_part = text(ds, "BodyPartExamined").upper()
    patient_id = text(ds, "PatientID")
    for what, value in (("BodyPartExamined", body_part), ("PatientID", patient_id)):
        if value != "*" and has_wildcard(value):
            raise QueryError("malformed", f"wildcards in {what} are not supported here")
    return Filters(
        modalities=modalities,
        date_from=date_from,
        date_to=date_to,
        body_part=body_part if body_part not in {"", "*"} else None,
        patient_id=patient_id if patient_id not in {"", "*"} else None,
        exclude_reference_patient=exclude_text in {"YES", "Y", "TRUE", "1"},
    )


# The study keys a viewer's query form usually fills in (STUDY_META_KEYS) that the similar query
# cannot match on (and, at IMAGE level, AccessionNumber). A value in one is refused, not ignored: an
# answer of every patient's studies to "PatientName=DOE*" would pass for a match. Empty or "*"
# (universal matching) is what viewers send for the columns they want back. Any other key is a
# return key only.
_READ_KEYS = ("PatientID", "StudyDate", "BodyPartExamined", "AccessionNumber")  # filters, or a reference
NOT_FILTERS = tuple(k for k in STUDY_META_KEYS if k not in _READ_KEYS)


def _refuse_other_matching(ds: Dataset, level: str) -> None:
    keys = NOT_FILTERS if level == "STUDY" else (*NOT_FILTERS, "AccessionNumber")  # a reference at STUDY only
    for keyword in keys:
        if text(ds, keyword).strip("*"):
            raise QueryError("malformed", f"{keyword} is not a filter of the similar query")


# resolve(accession, patient_id or None) -> StudyInstanceUID; raises QueryError (unknown, ambiguous)
AccessionResolver = Callable[[str, str | None], str]


def _accession_reference(ds: Dataset, resolve: AccessionResolver | None) -> str | None:
    """The study a STUDY-level query names by AccessionNumber (and PatientID), or None if it names none."""
    accession = text(ds, "AccessionNumber")
    if not accession or accession == "*":
        return None
    if "\\" in accession or has_wildcard(accession):
        raise QueryError("malformed", "AccessionNumber must name one study (no wildcard or list)")
    if resolve is None:
        raise QueryError("malformed", "no reference: give StudyInstanceUID")
    patient_id = text(ds, "PatientID")
    if has_wildcard(patient_id):
        raise QueryError("malformed", "PatientID with an AccessionNumber must be one patient")
    return resolve(accession, patient_id or None)


def parse_similar(
    ds: Dataset,
    called_ae: str,
    similar_ae_title: str,
    default_results: int,
    resolve_accession: AccessionResolver | None = None,
) -> SimilarQuery:
    """Read a similar-studies identifier; raise :class:`QueryError` when it is malformed.

    ``resolve_accession`` turns an AccessionNumber reference into its StudyInstanceUID (it reads
    the store, which parsing otherwise does not need); without it only UIDs name a reference.
    """
    level = text(ds, "QueryRetrieveLevel").upper()
    if level not in ("STUDY", "IMAGE"):
        raise QueryError("malformed", f"QueryRetrieveLevel {level or '(none)'!r}: similar is STUDY or IMAGE")
    reference = st.private_text(ds, st.REFERENCE_UID)
    uid_key = "StudyInstanceUID" if level == "STUDY" else "SOPInstanceUID"
    by_accession = False
    if not reference and called_ae.strip() == similar_ae_title.strip():
        reference = text(ds, uid_key)
        if reference == "*":
            reference = ""
        if not reference and level == "STUDY":
            reference = _accession_reference(ds, resolve_accession)
            by_accession = reference is not None
    if not reference:
        if called_ae.strip() != similar_ae_title.strip():
            raise QueryError("malformed", "no reference: the DRH-PACS 1 reference key is empty")
        also = " or AccessionNumber" if level == "STUDY" else ""
        raise QueryError("malformed", f"no reference: give {uid_key}{also}")
    if "\\" in reference or has_wildcard(reference) or not is_uid(reference):
        raise QueryError("malformed", f"reference {uid_key} is not a single valid UID")
    for offset in (st.NUMBER_OF_RESULTS, st.MAX_DISTANCE, st.EXCLUDE_REFERENCE_PATIENT):
        if st.private_is_binary(ds, offset):
            raise QueryError("malformed", "a DRH-PACS 1 key came as binary: load drh-pacs's dictionary")
    k = default_results
    k_text = st.private_text(ds, st.NUMBER_OF_RESULTS)
    if k_text:
        k = _positive_int(k_text, "number of results", 1)
    max_distance = None
    distance_text = st.private_text(ds, st.MAX_DISTANCE)
    if distance_text:
        max_distance = _positive_int(distance_text, "maximum distance", 0)
    _refuse_other_matching(ds, level)
    filters = _filters(ds, level)
    if by_accession:
        filters = replace(filters, patient_id=None)  # it said whose accession number, not whose priors
    return SimilarQuery(level, reference, k, max_distance, filters)


# -- answers ---------------------------------------------------------------------------------------
def needs_utf8(values: Iterable[object]) -> bool:
    return any(isinstance(v, str) and not v.isascii() for v in values)


def set_value(ds: Dataset, keyword: str, value: object) -> None:
    setattr(ds, keyword, "" if value is None else value)


def _study_value(keyword: str, study_uid: str, study: Mapping[str, str]) -> object:
    if keyword == "StudyInstanceUID":
        return study_uid
    if keyword == "ModalitiesInStudy":
        return modalities_of(study)
    if keyword == "NumberOfStudyRelatedInstances":
        return str(study.get("n_instances", ""))
    if keyword in STUDY_META_KEYS:
        return study.get(STUDY_META_KEYS[keyword], "")
    return None


def ranked_description(rank: int, score: float, k: int, description: str) -> str:
    """``#01 0.938 CHEST PA``: the rank (zero-padded to the width of k, so a text sort keeps the
    order), the score, then the study's own description, within LO's 64 characters."""
    width = len(str(max(k, rank)))
    return f"#{rank:0{width}d} {score:.3f} {description}".strip()[:64]


def similar_answer(
    result: SimilarResult,
    query: SimilarQuery,
    requested: tuple[str, ...],
    retrieve_ae: str,
    model_version: str = "",
    rank_in_description: bool = True,
    route: str = "",
) -> Dataset:
    """One pending response: the usual study-level keys, what was asked, and rank/distance/score
    (private elements; also in StudyDescription unless ``rank_in_description`` is False)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    set_value(ds, "StudyInstanceUID", result.study_uid)
    keys = list(STUDY_RETURN_KEYS)
    if query.level == "IMAGE":
        keys += IMAGE_RETURN_KEYS
    keys += [k for k in requested if k not in keys]
    for keyword in keys:
        if keyword in {"QueryRetrieveLevel", "StudyInstanceUID", "RetrieveAETitle", "SpecificCharacterSet"}:
            continue
        value = _study_value(keyword, result.study_uid, result.study)
        if keyword == "SOPInstanceUID" and query.level == "IMAGE":
            value = result.uid
        elif result.instance is not None and keyword in INSTANCE_META_KEYS:
            value = result.instance.get(INSTANCE_META_KEYS[keyword], "")
        if value is None:
            if keyword in requested:
                set_value(ds, keyword, "")  # asked for, unknown to us: present and empty, as the standard wants
            continue
        set_value(ds, keyword, value)
    ds.RetrieveAETitle = retrieve_ae
    if rank_in_description:
        own = str(result.study.get(STUDY_META_KEYS["StudyDescription"], "") or "")
        ds.StudyDescription = ranked_description(result.rank, result.score, query.k, own)
    if needs_utf8(result.study.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    st.set_private(ds, st.REFERENCE_UID, query.reference_uid)
    st.set_private(ds, st.RANK, str(result.rank))
    st.set_private(ds, st.DISTANCE, str(result.distance))
    st.set_private(ds, st.SCORE, f"{result.score:.4f}")
    if model_version:
        st.set_private(ds, st.MODEL_VERSION, model_version[:64])
    if route:
        st.set_private(ds, st.MODEL_ROUTE, route[:64])
    return ds


def failure_status(error: QueryError) -> int:
    """The DIMSE failure status of a refused query.

    "Index not ready" is out of resources (ask again shortly); everything else, including an
    accession number that several studies share ("ambiguous-reference": the ErrorComment asks for
    the PatientID), is "unable to process" with the comment saying why.
    """
    return st.OUT_OF_RESOURCES if error.reason == "index-not-ready" else st.UNABLE_TO_PROCESS
