"""Plain Study Root / Patient Root C-FIND: PS3.4 C.2.2.2 matching over the study and instance records.

Answered from the store's records (:meth:`plugin.store.records.Records.studies_with_instances`), so a
viewer can browse what drh-pacs holds, drill down into a returned study (SERIES, IMAGE) and retrieve it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from plugin.core.header import is_uid
from plugin.dicom.similar import STUDY_META_KEYS, has_wildcard, needs_utf8, requested_keys, set_value, text
from plugin.search.errors import QueryError
from plugin.search.filters import parse_date_range
from plugin.search.query import modalities_of

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# How each keyword is matched in a plain query (PS3.4 C.2.2.2).
_UID_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
_DATE_KEYS = {"StudyDate", "PatientBirthDate"}
_TIME_KEYS = {"StudyTime"}
_MULTI_KEYS = {"ModalitiesInStudy"}
_COUNT_KEYS = {
    "NumberOfStudyRelatedInstances",
    "NumberOfStudyRelatedSeries",
    "NumberOfSeriesRelatedInstances",
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedInstances",
}
# Keys never matched on (return-only or transport).
_NOT_MATCHED = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", *_COUNT_KEYS}


@dataclass(frozen=True)
class PlainQuery:
    level: str  # PATIENT, STUDY, SERIES or IMAGE
    matching: dict[str, str]  # keyword -> non-empty matching value
    requested: tuple[str, ...]


def parse_plain(ds: Dataset, model: str = "study") -> PlainQuery:
    """Read a plain Study Root / Patient Root identifier (``model`` is ``study`` or ``patient``)."""
    level = text(ds, "QueryRetrieveLevel").upper()
    if level not in LEVELS:
        raise QueryError("malformed", f"QueryRetrieveLevel {level or '(none)'!r} is not valid")
    if model == "study" and level == "PATIENT":
        raise QueryError("malformed", "Study Root has no PATIENT level")
    matching: dict[str, str] = {}
    for keyword in requested_keys(ds):
        if keyword in _NOT_MATCHED:
            continue
        value = text(ds, keyword)
        if not value or value == "*":
            continue
        if keyword in _UID_KEYS:
            if has_wildcard(value) or not all(is_uid(u) for u in value.split("\\")):
                raise QueryError("malformed", f"{keyword} is not a UID or a list of UIDs")
        elif keyword in _DATE_KEYS:
            parse_date_range(value)
        matching[keyword] = value
    return PlainQuery(level, matching, requested_keys(ds))


def _match_text(candidate: str, pattern: str, keyword: str) -> bool:
    if keyword == "PatientName":
        candidate, pattern = candidate.upper(), pattern.upper()
    if has_wildcard(pattern):
        return fnmatch.fnmatchcase(candidate, pattern.replace("[", "[[]"))
    return candidate == pattern


def match_value(keyword: str, candidate: object, pattern: str) -> bool:
    """PS3.4 C.2.2.2 matching of one key: single value, wildcard, UID list, range, multi-valued."""
    if keyword in _UID_KEYS:
        return str(candidate) in pattern.split("\\")
    if keyword in _DATE_KEYS:
        start, end = parse_date_range(pattern)
        text = str(candidate or "")
        if not text:
            return False
        return (start is None or text >= start) and (end is None or text <= end)
    if keyword in _TIME_KEYS:
        text = str(candidate or "")
        if "-" in pattern:
            start, _, end = pattern.partition("-")
            return (not start or text >= start.strip()) and (not end or text <= end.strip() + "\uffff")
        return text.startswith(pattern.split(".")[0]) if pattern else True
    if keyword in _MULTI_KEYS:
        values = candidate if isinstance(candidate, list) else [str(candidate)]
        wanted = [p for p in pattern.split("\\") if p]
        return any(_match_text(v, p, keyword) for v in values for p in wanted)
    return _match_text(str(candidate or ""), pattern, keyword)


def study_record(study_uid: str, study: Mapping[str, str], instances: list[dict[str, str]]) -> dict[str, object]:
    """A study's attributes by DICOM keyword, for plain matching and answers."""
    record: dict[str, object] = {kw: study.get(name, "") for kw, name in STUDY_META_KEYS.items()}
    series = {i.get("series_uid") for i in instances if i.get("series_uid")}
    modalities = modalities_of(study) or sorted({i.get("modality", "") for i in instances if i.get("modality")})
    record.update(
        StudyInstanceUID=study_uid,
        ModalitiesInStudy=modalities,
        NumberOfStudyRelatedInstances=str(study.get("n_instances") or len(instances)),
        NumberOfStudyRelatedSeries=str(len(series)),
    )
    return record


def iter_plain(
    query: PlainQuery,
    studies: Iterable[tuple[str, dict[str, str], list[dict[str, str]]]],
) -> Iterator[dict[str, object]]:
    """Records that match ``query``; ``studies`` yields (study uid, study meta, its instances' meta).

    An instance's dict carries ``sop_uid`` besides the :data:`INSTANCE_META_KEYS` fields.
    """
    level = query.level
    patients: dict[str, dict[str, object]] = {}
    for study_uid, study, instances in studies:
        record = study_record(study_uid, study, instances)
        if level == "PATIENT":
            pid = str(record.get("PatientID", ""))
            entry = patients.setdefault(
                pid,
                {
                    "PatientID": pid,
                    "PatientName": record.get("PatientName", ""),
                    "PatientBirthDate": record.get("PatientBirthDate", ""),
                    "PatientSex": record.get("PatientSex", ""),
                    "NumberOfPatientRelatedStudies": 0,
                    "NumberOfPatientRelatedInstances": 0,
                },
            )
            entry["NumberOfPatientRelatedStudies"] = int(entry["NumberOfPatientRelatedStudies"]) + 1
            entry["NumberOfPatientRelatedInstances"] = int(entry["NumberOfPatientRelatedInstances"]) + len(instances)
            continue
        if not _matches(record, query.matching, _STUDY_AND_ABOVE):
            continue
        if level == "STUDY":
            yield record
            continue
        by_series: dict[str, list[dict[str, str]]] = {}
        for inst in instances:
            by_series.setdefault(inst.get("series_uid", ""), []).append(inst)
        for series_uid, members in sorted(by_series.items()):
            first = members[0]
            series_record = dict(record)
            series_record.update(
                SeriesInstanceUID=series_uid,
                Modality=first.get("modality", ""),
                SeriesNumber=first.get("series_number", ""),
                NumberOfSeriesRelatedInstances=str(len(members)),
            )
            if not _matches(series_record, query.matching, _SERIES_KEYS):
                continue
            if level == "SERIES":
                yield series_record
                continue
            for inst in members:
                image_record = dict(series_record)
                image_record.update(
                    SOPInstanceUID=inst.get("sop_uid", ""),
                    SOPClassUID=inst.get("sop_class_uid", ""),
                    InstanceNumber=inst.get("instance_number", ""),
                )
                if _matches(image_record, query.matching, _IMAGE_KEYS):
                    yield image_record
    if level == "PATIENT":
        for entry in patients.values():
            entry = {k: str(v) if isinstance(v, int) else v for k, v in entry.items()}
            if _matches(entry, query.matching, _PATIENT_KEYS):
                yield entry


_PATIENT_KEYS = {"PatientID", "PatientName", "PatientBirthDate", "PatientSex"}
_STUDY_AND_ABOVE = _PATIENT_KEYS | set(STUDY_META_KEYS) | {"StudyInstanceUID", "ModalitiesInStudy"}
_SERIES_KEYS = {"SeriesInstanceUID", "Modality", "SeriesNumber"}
_IMAGE_KEYS = {"SOPInstanceUID", "SOPClassUID", "InstanceNumber"}


def _matches(record: Mapping[str, object], matching: Mapping[str, str], keys: set[str]) -> bool:
    for keyword, pattern in matching.items():
        if keyword not in keys:
            continue
        if keyword not in record or not match_value(keyword, record[keyword], pattern):
            return False
    return True


def plain_answer(record: Mapping[str, object], query: PlainQuery, retrieve_ae: str) -> Dataset:
    """A pending response with the keys the requester asked for (and the level's unique keys)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    unique = {
        "PATIENT": ["PatientID"],
        "STUDY": ["StudyInstanceUID"],
        "SERIES": ["StudyInstanceUID", "SeriesInstanceUID"],
        "IMAGE": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"],
    }[query.level]
    for keyword in [*unique, *query.requested]:
        if keyword in {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"} or keyword in ds:
            continue
        set_value(ds, keyword, record.get(keyword, ""))
    if query.level != "PATIENT":
        ds.RetrieveAETitle = retrieve_ae
    if needs_utf8(record.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
