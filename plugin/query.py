"""C-FIND identifiers in, answers out: the similar-studies query and plain Query/Retrieve matching.

No networking here: :mod:`plugin.handlers` speaks DIMSE and calls these functions with the store and
the replica indexes it was given. Everything a requester can get wrong is raised as
:class:`QueryError` carrying the failure status and an ErrorComment that says what was wrong, because
an empty success would tell a radiologist "nothing similar" when the truth is "ask again later" or
"your viewer sent something I cannot read".

Two ways to ask for similar studies (SPEC "The similar-studies query over DICOM"):

1. the called AE title is ``Settings.similar_ae_title``: StudyInstanceUID (STUDY level) or
   SOPInstanceUID (IMAGE level) names the reference, it is not a filter;
2. any called AE title: our private block (creator ``DRH-PACS 1``) carries the reference UID, the
   number of results and an optional maximum Hamming distance.

Filters come from standard matching keys: ModalitiesInStudy, a StudyDate (range), BodyPartExamined,
PatientID (one patient's priors) and, in the private block, "exclude the reference patient".
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

from plugin import dicom_status as st
from plugin.dicom_meta import is_uid

log = logging.getLogger("drh.query")

# The most results one similar query may ask for: a viewer lists them, nobody reads 10 000 rows,
# and each is a pending response on the wire.
MAX_RESULTS = 1000

SIMILAR_LEVELS = ("STUDY", "IMAGE")
PLAIN_LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

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

# DICOM keyword -> field of the study metadata hash written by the workers (plugin.dicom_meta).
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

_DATE_RE = re.compile(r"^\d{8}$")


class QueryError(Exception):
    """A request we refuse: ``status`` goes back to the requester with ``comment`` as ErrorComment.

    ``reason`` is a short machine-friendly tag (malformed, unknown-reference, not-indexed,
    index-not-ready) for logs and the HTTP API.
    """

    def __init__(self, reason: str, comment: str, status: int = st.UNABLE_TO_PROCESS) -> None:
        super().__init__(comment)
        self.reason = reason
        # ErrorComment is LO: 64 characters at most.
        self.comment = comment[:64]
        self.status = status


@dataclass(frozen=True)
class SimilarFilters:
    """Study-attribute filters of a similar query (None or empty: no filter)."""

    modalities: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
    body_part: str | None = None
    patient_id: str | None = None
    exclude_reference_patient: bool = False


@dataclass(frozen=True)
class SimilarQuery:
    level: str  # STUDY or IMAGE
    reference_uid: str
    k: int
    max_distance: int | None = None
    filters: SimilarFilters = field(default_factory=SimilarFilters)
    requested: tuple[str, ...] = ()  # keywords present in the identifier, echoed in answers


@dataclass(frozen=True)
class PlainQuery:
    level: str  # PATIENT, STUDY, SERIES or IMAGE
    matching: dict[str, str]  # keyword -> non-empty matching value
    requested: tuple[str, ...]


@dataclass(frozen=True)
class SimilarResult:
    rank: int
    uid: str
    distance: int
    score: float
    study_uid: str
    study: dict[str, str]
    instance: dict[str, str] | None = None


# -- parsing ---------------------------------------------------------------------------------------
def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _requested(ds: Dataset) -> tuple[str, ...]:
    out = []
    for elem in ds:
        if elem.tag.is_private or elem.tag.group == 0x0002:
            continue
        if elem.keyword:
            out.append(elem.keyword)
    return tuple(out)


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


def is_similar_request(ds: Dataset, called_ae: str, similar_ae_title: str) -> bool:
    """True when this C-FIND asks for similar studies rather than plain matching."""
    if called_ae.strip() == similar_ae_title.strip():
        return True
    return st.private_text(ds, st.REFERENCE_UID) is not None


def parse_date_range(value: str) -> tuple[str | None, str | None]:
    """``YYYYMMDD``, ``YYYYMMDD-``, ``-YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD`` -> (from, to), inclusive."""
    value = value.strip()
    if not value:
        return None, None
    if "-" in value:
        start, _, end = value.partition("-")
        start, end = start.strip(), end.strip()
        if (start and not _DATE_RE.match(start)) or (end and not _DATE_RE.match(end)) or not (start or end):
            raise QueryError("malformed", f"StudyDate range {value!r} is not YYYYMMDD-YYYYMMDD")
        if start and end and start > end:
            raise QueryError("malformed", f"StudyDate range {value!r} ends before it starts")
        return start or None, end or None
    if not _DATE_RE.match(value):
        raise QueryError("malformed", f"StudyDate {value!r} is not YYYYMMDD")
    return value, value


def _positive_int(text: str, what: str, minimum: int) -> int:
    try:
        number = int(text.strip())
    except ValueError:
        raise QueryError("malformed", f"{what} {text!r} is not an integer") from None
    if number < minimum:
        raise QueryError("malformed", f"{what} must be >= {minimum}")
    return number


def parse_similar(ds: Dataset, called_ae: str, similar_ae_title: str, default_results: int) -> SimilarQuery:
    """Read a similar-studies identifier; raise :class:`QueryError` when it is malformed."""
    level = _text(ds, "QueryRetrieveLevel").upper()
    if level not in SIMILAR_LEVELS:
        raise QueryError("malformed", f"QueryRetrieveLevel {level or '(none)'!r}: similar is STUDY or IMAGE")
    reference = st.private_text(ds, st.REFERENCE_UID)
    uid_key = "StudyInstanceUID" if level == "STUDY" else "SOPInstanceUID"
    if not reference and called_ae.strip() == similar_ae_title.strip():
        reference = _text(ds, uid_key)
    if not reference:
        raise QueryError("malformed", f"no reference: give {uid_key} or the DRH-PACS 1 reference key")
    if "\\" in reference or _has_wildcard(reference) or not is_uid(reference):
        raise QueryError("malformed", f"reference {uid_key} is not a single valid UID")

    k = default_results
    k_text = st.private_text(ds, st.NUMBER_OF_RESULTS)
    if k_text:
        k = _positive_int(k_text, "number of results", 1)
    k = min(k, MAX_RESULTS)
    max_distance = None
    distance_text = st.private_text(ds, st.MAX_DISTANCE)
    if distance_text:
        max_distance = _positive_int(distance_text, "maximum distance", 0)
    exclude_text = (st.private_text(ds, st.EXCLUDE_REFERENCE_PATIENT) or "").upper()
    if exclude_text not in {"", "YES", "Y", "TRUE", "1", "NO", "N", "FALSE", "0"}:
        raise QueryError("malformed", f"exclude reference patient {exclude_text!r} is not YES or NO")

    modalities_text = _text(ds, "ModalitiesInStudy")
    if level == "IMAGE" and not modalities_text:
        modalities_text = _text(ds, "Modality")
    modalities = tuple(m.strip().upper() for m in modalities_text.split("\\") if m.strip() and m.strip() != "*")
    if any(_has_wildcard(m) for m in modalities):
        raise QueryError("malformed", "wildcards in ModalitiesInStudy are not supported here")
    date_from, date_to = parse_date_range(_text(ds, "StudyDate"))
    body_part = _text(ds, "BodyPartExamined").upper()
    patient_id = _text(ds, "PatientID")
    for what, value in (("BodyPartExamined", body_part), ("PatientID", patient_id)):
        if value != "*" and _has_wildcard(value):
            raise QueryError("malformed", f"wildcards in {what} are not supported here")
    filters = SimilarFilters(
        modalities=modalities,
        date_from=date_from,
        date_to=date_to,
        body_part=body_part if body_part not in {"", "*"} else None,
        patient_id=patient_id if patient_id not in {"", "*"} else None,
        exclude_reference_patient=exclude_text in {"YES", "Y", "TRUE", "1"},
    )
    return SimilarQuery(level, reference, k, max_distance, filters, _requested(ds))


def parse_plain(ds: Dataset, model: str = "study") -> PlainQuery:
    """Read a plain Study Root / Patient Root identifier (``model`` is ``study`` or ``patient``)."""
    level = _text(ds, "QueryRetrieveLevel").upper()
    if level not in PLAIN_LEVELS:
        raise QueryError("malformed", f"QueryRetrieveLevel {level or '(none)'!r} is not valid")
    if model == "study" and level == "PATIENT":
        raise QueryError("malformed", "Study Root has no PATIENT level")
    matching: dict[str, str] = {}
    for keyword in _requested(ds):
        if keyword in _NOT_MATCHED:
            continue
        value = _text(ds, keyword)
        if not value or value == "*":
            continue
        if keyword in _UID_KEYS:
            if _has_wildcard(value) or not all(is_uid(u) for u in value.split("\\")):
                raise QueryError("malformed", f"{keyword} is not a UID or a list of UIDs")
        elif keyword in _DATE_KEYS:
            parse_date_range(value)
        matching[keyword] = value
    return PlainQuery(level, matching, _requested(ds))


# -- similar search --------------------------------------------------------------------------------
def _study_uid_of(level: str, uid: str, store: Any) -> tuple[str | None, dict[str, str]]:
    if level == "STUDY":
        return uid, store.study(uid)
    instance = store.instance(uid)
    study_uid = instance.get("study_uid")
    return study_uid, instance


def run_similar(query: SimilarQuery, store: Any, indexes: Mapping[str, Any]) -> list[SimilarResult]:
    """The k nearest studies (or images) to the reference, nearest first, reference excluded."""
    index = indexes.get("study" if query.level == "STUDY" else "image")
    if index is None:
        raise QueryError("index-not-ready", "index not ready: try again shortly", st.OUT_OF_RESOURCES)
    # The background refresher keeps the replica within a fraction of a second of Redis; a
    # reference it does not know yet (indexed just now) gets one refresh before it is refused.
    # Every Redis round trip saved here is latency a viewer sees.
    code = index.code_of(query.reference_uid) if index.ready else None
    if code is None:
        try:
            index.refresh()  # one round trip when nothing changed; loads the replica the first time
        except Exception as exc:  # noqa: BLE001 - Redis away: answer from the replica we have, if any
            log.warning("replica refresh failed (%s); answering from the replica as it is", type(exc).__name__)
        if not index.ready:
            raise QueryError("index-not-ready", "index not ready: try again shortly", st.OUT_OF_RESOURCES)
        code = index.code_of(query.reference_uid)
    what = "study" if query.level == "STUDY" else "instance"
    if code is None:
        _, known = _study_uid_of(query.level, query.reference_uid, store)
        if known:
            raise QueryError("not-indexed", f"reference {what} not yet indexed: try again later")
        raise QueryError("unknown-reference", f"unknown reference {what}")

    exclude_patient = None
    if query.filters.exclude_reference_patient:
        reference_study_uid, _ = _study_uid_of(query.level, query.reference_uid, store)
        exclude_patient = store.study(reference_study_uid or "").get("patient_id") or None
    return search_code(code, query, store, index, exclude_uids=(query.reference_uid,), exclude_patient=exclude_patient)


def search_code(
    code: bytes,
    query: SimilarQuery,
    store: Any,
    index: Any,
    *,
    exclude_uids: tuple[str, ...] = (),
    exclude_patient: str | None = None,
) -> list[SimilarResult]:
    """The k nearest to ``code`` in ``index`` with the query's filters, as ranked results with metadata."""
    from plugin.index import SearchFilters

    f = query.filters
    filters = SearchFilters(
        modalities=set(f.modalities) or None,
        date_from=f.date_from,
        date_to=f.date_to,
        body_part=f.body_part,
        patient_id=f.patient_id,
        exclude_patient_id=exclude_patient,
    )
    hits = index.search(code, query.k, max_distance=query.max_distance, filters=filters, exclude_uids=exclude_uids)
    hits = [h for h in hits if h.uid not in exclude_uids]  # never, whatever the index does
    nbits = int(index.nbits)
    instances: list[dict[str, str] | None] = [None] * len(hits)
    if query.level == "STUDY":
        study_uids = [h.uid for h in hits]
    else:
        instances = list(_hgetall_many(store, [store.keys.instance(h.uid) for h in hits]))
        study_uids = [(i or {}).get("study_uid", "") for i in instances]
    studies = list(_hgetall_many(store, [store.keys.study(u) for u in study_uids]))
    missing = [n for n, st_ in enumerate(studies) if st_ and not st_.get("n_instances")]
    if missing:  # older metadata without the count: one SCARD each, pipelined
        pipe = store.r.pipeline(transaction=False)
        for n in missing:
            pipe.scard(store.keys.study_instances(study_uids[n]))
        for n, count in zip(missing, pipe.execute(), strict=True):
            studies[n] = {**studies[n], "n_instances": str(count)}
    results: list[SimilarResult] = []
    for hit, study_uid, study, instance in zip(hits, study_uids, studies, instances, strict=True):
        score = max(0.0, 1.0 - int(hit.distance) / nbits) if nbits else 0.0
        results.append(
            SimilarResult(
                rank=len(results) + 1,
                uid=hit.uid,
                distance=int(hit.distance),
                score=round(score, 4),
                study_uid=study_uid or "",
                study=study or {},
                instance=instance,
            )
        )
    return results


def _hgetall_many(store: Any, keys: list[str]) -> Iterator[dict[str, str]]:
    """HGETALL of several hashes in one round trip (answers stay in request order)."""
    if not keys:
        return
    pipe = store.r.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    for raw in pipe.execute():
        yield {k.decode(): v.decode() for k, v in raw.items()}


# -- answers ---------------------------------------------------------------------------------------
def _modalities(study: Mapping[str, str]) -> list[str]:
    raw = study.get("modalities", "") or ""
    return [m for m in re.split(r"[\\,\s]+", raw) if m]


def _needs_utf8(values: Iterable[object]) -> bool:
    return any(isinstance(v, str) and not v.isascii() for v in values)


def _set(ds: Dataset, keyword: str, value: object) -> None:
    if value is None:
        value = ""
    setattr(ds, keyword, value)


def _study_value(keyword: str, study_uid: str, study: Mapping[str, str], n_instances: int | None) -> object:
    if keyword == "StudyInstanceUID":
        return study_uid
    if keyword == "ModalitiesInStudy":
        return _modalities(study)
    if keyword == "NumberOfStudyRelatedInstances":
        if study.get("n_instances"):
            return str(study["n_instances"])
        return str(n_instances) if n_instances is not None else ""
    if keyword in STUDY_META_KEYS:
        return study.get(STUDY_META_KEYS[keyword], "")
    return None


def similar_answer(
    result: SimilarResult,
    query: SimilarQuery,
    retrieve_ae: str,
    model_version: str = "",
    n_instances: int | None = None,
) -> Dataset:
    """One pending response: the usual study-level keys, what was asked, and rank/distance/score."""
    ds = Dataset()
    ds.QueryRetrieveLevel = query.level
    _set(ds, "StudyInstanceUID", result.study_uid)
    keys = list(STUDY_RETURN_KEYS)
    if query.level == "IMAGE":
        keys += IMAGE_RETURN_KEYS
    keys += [k for k in query.requested if k not in keys]
    for keyword in keys:
        if keyword in {"QueryRetrieveLevel", "StudyInstanceUID", "RetrieveAETitle", "SpecificCharacterSet"}:
            continue
        value = _study_value(keyword, result.study_uid, result.study, n_instances)
        if keyword == "SOPInstanceUID" and query.level == "IMAGE":
            value = result.uid
        elif result.instance is not None and keyword in INSTANCE_META_KEYS:
            value = result.instance.get(INSTANCE_META_KEYS[keyword], "")
        if value is None:
            if keyword in query.requested:
                _set(ds, keyword, "")  # asked for, unknown to us: present and empty, as the standard wants
            continue
        _set(ds, keyword, value)
    ds.RetrieveAETitle = retrieve_ae
    if _needs_utf8(result.study.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    st.set_private(ds, st.REFERENCE_UID, query.reference_uid)
    st.set_private(ds, st.RANK, str(result.rank))
    st.set_private(ds, st.DISTANCE, str(result.distance))
    st.set_private(ds, st.SCORE, f"{result.score:.4f}")
    if model_version:
        st.set_private(ds, st.MODEL_VERSION, model_version[:64])
    return ds


def failure_identifier(error: QueryError) -> Dataset:
    """The identifier sent with a failure status: the ErrorComment says what went wrong."""
    ds = Dataset()
    ds.ErrorComment = error.comment
    return ds


# -- plain matching --------------------------------------------------------------------------------
def _match_text(candidate: str, pattern: str, keyword: str) -> bool:
    if keyword == "PatientName":
        candidate, pattern = candidate.upper(), pattern.upper()
    if _has_wildcard(pattern):
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
    modalities = _modalities(study) or sorted({i.get("modality", "") for i in instances if i.get("modality")})
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
        _set(ds, keyword, record.get(keyword, ""))
    if query.level != "PATIENT":
        ds.RetrieveAETitle = retrieve_ae
    if _needs_utf8(record.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def iter_study_uids(store: Any) -> Iterator[str]:
    """Every study with metadata in the store (SCAN, so a large archive does not block Redis)."""
    prefix = store.keys.study("")
    for key in store.r.scan_iter(match=store.keys.study("*"), count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        uid = name[len(prefix) :]
        if ":" not in uid:
            yield uid


def store_studies(
    store: Any, study_uids: Iterable[str], with_instances: bool, batch: int = 500
) -> Iterator[tuple[str, dict[str, str], list[dict[str, str]]]]:
    """(uid, metadata, instances) of each study that has metadata, for :func:`iter_plain`.

    Pipelined by ``batch`` studies, so a plain query over a large archive is a few round trips per
    thousand studies rather than several per study.
    """
    pending: list[str] = []
    for uid in study_uids:
        pending.append(uid)
        if len(pending) >= batch:
            yield from _store_batch(store, pending, with_instances)
            pending = []
    if pending:
        yield from _store_batch(store, pending, with_instances)


def _store_batch(
    store: Any, uids: list[str], with_instances: bool
) -> Iterator[tuple[str, dict[str, str], list[dict[str, str]]]]:
    pipe = store.r.pipeline(transaction=False)
    for uid in uids:
        pipe.hgetall(store.keys.study(uid))
        pipe.smembers(store.keys.study_instances(uid))
    raw = pipe.execute()
    rows = []
    for n, uid in enumerate(uids):
        study = {k.decode(): v.decode() for k, v in raw[2 * n].items()}
        if study:
            rows.append((uid, study, sorted(m.decode() for m in raw[2 * n + 1])))
    sop_meta: dict[str, dict[str, str]] = {}
    if with_instances:
        all_sops = [sop for _, _, sops in rows for sop in sops]
        sop_meta = dict(zip(all_sops, _hgetall_many(store, [store.keys.instance(s) for s in all_sops]), strict=True))
    for uid, study, sops in rows:
        yield uid, study, [{"sop_uid": sop, **sop_meta.get(sop, {})} for sop in sops]
