"""DICOMweb for viewers: a QIDO-RS root that answers "similar to", plain queries on what drh-pacs
holds, and the WADO-RS renderings of :mod:`plugin.http.rendered`.

**The similar root, ``/dicom-web/similar``** (what the called AE title ``SIMILAR`` is over DICOM): the
standard keys name the *reference*, not a match.

- ``GET /dicom-web/similar/studies?StudyInstanceUID=<uid>``, or ``?AccessionNumber=<number>`` (with
  ``PatientID`` when the number is not unique; it then names the reference's patient, it is not a
  filter): the studies most similar to the reference, nearest first.
- ``GET /dicom-web/similar/instances?SOPInstanceUID=<uid>``: the most similar images.
- Filters are QIDO matching parameters (:func:`plugin.search.filters.qido_filters`):
  ``ModalitiesInStudy``, ``StudyDate`` (range), ``BodyPartExamined``, ``PatientID`` (one patient's
  priors) and ``DRHExcludeReferencePatient=YES``; ``DRHMaximumDistance`` bounds the Hamming distance.
  Attributes may be keywords or tags (``00080061``). ``limit`` (default ``Settings.default_results``)
  and ``offset`` page through the ranking, which is at most ``Settings.max_results`` deep (a larger
  ``limit`` answers fewer, as QIDO lets a server); ``includefield`` adds attributes; ``fuzzymatching`` is not
  supported (the standard ``Warning`` header says so). Matching on any other attribute is refused
  (400), never ignored: a list that silently dropped a filter would mislead.
- Each answer is ``application/dicom+json``: the usual study attributes (instance attributes too for
  ``instances``), the private block of creator ``DRH-PACS 1`` (group 0099: ``1001`` reference UID,
  ``1004`` rank, ``1005`` Hamming distance, ``1006`` score, ``1008`` model version), and
  ``RetrieveURL`` pointing at the PACS's WADO-RS (``Settings.pacs_wado_root``) where one is set.
- Refusals: 400 malformed, 404 unknown reference, 409 not indexed yet or ambiguous accession number,
  422 received but none of it indexable,
  503 index not ready (with ``Retry-After``); the body is JSON ``{"error", "detail"}``.

**Per-reference roots**, for a viewer that is given a fixed QIDO root (OHIF, ``deploy/viewers/ohif``):
``/dicom-web/similar/study/{StudyInstanceUID}``, ``/dicom-web/similar/accession/{AccessionNumber}``
(``.../accession/{number}/patient/{PatientID}`` when the number is not unique) and
``/dicom-web/similar/instance/{SOPInstanceUID}`` (``instances`` only). The root's collection is the
reference's ranked list, and every key *matches in it*, as QIDO keys do: ``StudyInstanceUID=X``
answers X (with its rank) when it is in the list, ``PatientID`` keeps one patient's studies. A viewer
that opens a listed study and asks the root for it, as OHIF does, finds it.

**The plain root, ``/dicom-web``**: ``studies?StudyInstanceUID=`` (a comma list) or
``studies?AccessionNumber=`` (+ ``PatientID``) from the study records, so a page or script can show
the reference itself.

**Under both roots** a viewer can open a returned study: ``studies/{study}/series``,
``studies/{study}/series/{series}/instances`` and ``studies/{study}/instances`` (from the records of
what drh-pacs received), and the thumbnails and rendered frames of :mod:`plugin.http.rendered`. Full
metadata and pixel data (WADO-RS retrieve) stay with the PACS: ``RetrieveURL`` points there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from plugin.core.header import is_uid
from plugin.dicom import similar as dicom_similar
from plugin.http import rendered
from plugin.http.search import error_response
from plugin.search import query as q
from plugin.search.errors import QueryError
from plugin.search.filters import QIDO_EXCLUDE_KEY, QIDO_FILTER_KEYS, qido_filters

MEDIA_TYPE = "application/dicom+json"
RESERVED = {"limit", "offset", "fuzzymatching", "includefield"}
MAX_DISTANCE_KEY = "DRHMaximumDistance"
# Value representations of bulk data: never in a query answer, whatever includefield asks.
BULK_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "OB or OW", "UN"}
# The study attributes every study answer carries (PS3.18 table 10.6.3-3, those drh-pacs records).
STUDY_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedInstances",
)
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "SeriesInstanceUID", "SeriesNumber", "Modality")
FUZZY_WARNING = (
    '299 drh-pacs: "The fuzzymatching parameter is not supported. Only literal matching has been performed."'
)


# -- request parsing ------------------------------------------------------------------------------
def _keyword(attribute: str) -> str:
    """A QIDO attribute ID (keyword or 8-digit tag) as its keyword; unknown ones are returned as given."""
    if len(attribute) == 8:
        try:
            return keyword_for_tag(int(attribute, 16)) or attribute
        except ValueError:
            return attribute
    return attribute


def qido_params(request: Request) -> tuple[dict[str, str], dict[str, str]]:
    """(matching parameters by keyword, reserved parameters) of a QIDO request; repeated parameters
    are joined with commas (``ModalitiesInStudy=CT&ModalitiesInStudy=MR``)."""
    matching: dict[str, list[str]] = {}
    reserved: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        if key.lower() in RESERVED:
            reserved.setdefault(key.lower(), []).append(value)
        else:
            matching.setdefault(_keyword(key), []).append(value)
    return ({k: ",".join(v) for k, v in matching.items()}, {k: ",".join(v) for k, v in reserved.items()})


def _page(reserved: Mapping[str, str], default_limit: int) -> tuple[int, int]:
    def number(name: str, default: int, minimum: int) -> int:
        raw = (reserved.get(name) or "").strip()
        if not raw:
            return default
        if not raw.isdigit() or int(raw) < minimum:
            raise QueryError("malformed", f"{name} must be an integer >= {minimum}")
        return int(raw)

    return number("limit", default_limit, 1), number("offset", 0, 0)


def _include(reserved: Mapping[str, str]) -> tuple[str, ...]:
    """``includefield`` attributes: standard keywords of attributes a query answers (``all``, unknown
    names and bulk data such as PixelData add nothing)."""
    fields = [_keyword(f.strip()) for f in (reserved.get("includefield") or "").split(",") if f.strip()]
    out = []
    for name in fields:
        tag = tag_for_keyword(name)
        if tag is None or name in {"RetrieveURL", "QueryRetrieveLevel"}:
            continue
        if dictionary_VR(tag) in BULK_VRS:
            continue
        out.append(name)
    return tuple(out)


def _refuse_other_matching(params: Mapping[str, str], allowed: Iterable[str]) -> None:
    """A matching value on an attribute we cannot match is an error, not a silent no-op."""
    allowed = set(allowed)
    for key, value in params.items():
        if key not in allowed and value.strip() not in {"", "*"}:
            raise QueryError("malformed", f"matching on {key} is not supported by this search")


def _accepts_json(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    if not accept:
        return True
    for part in accept.split(","):
        media = part.split(";")[0].strip().lower()
        if media in {MEDIA_TYPE, "application/json", "application/*", "*/*"}:
            return True
    return False


def _reference(params: Mapping[str, str], level: str, store: Any) -> tuple[str, bool]:
    """(reference UID, whether PatientID named the reference's patient rather than a filter)."""
    if level == "IMAGE":
        uid = (params.get("SOPInstanceUID") or "").strip()
        if not uid:
            raise QueryError("malformed", "name the reference image: SOPInstanceUID")
        if not is_uid(uid):
            raise QueryError("malformed", "SOPInstanceUID is not a single valid UID")
        return uid, False
    uid = (params.get("StudyInstanceUID") or "").strip()
    accession = (params.get("AccessionNumber") or "").strip()
    if uid and accession:
        raise QueryError("malformed", "name the reference once: StudyInstanceUID or AccessionNumber")
    if uid:
        if not is_uid(uid):
            raise QueryError("malformed", "StudyInstanceUID is not a single valid UID")
        return uid, False
    if accession:
        if any(c in accession for c in "*?,\\"):
            raise QueryError("malformed", "AccessionNumber names one study: no wildcard or list")
        patient_id = (params.get("PatientID") or "").strip() or None
        return q.study_by_accession(store, accession, patient_id), patient_id is not None
    raise QueryError("malformed", "name the reference study: StudyInstanceUID or AccessionNumber")


@dataclass(frozen=True)
class PathReference:
    """The reference a per-reference root names in its path (``study/{uid}``, ``accession/{number}``
    with an optional ``patient/{id}``, ``instance/{uid}``)."""

    kind: str  # "study", "accession" or "instance"
    value: str
    patient_id: str | None = None

    def resolve(self, store: Any) -> str:
        if self.kind == "accession":
            return q.study_by_accession(store, self.value, self.patient_id)
        if not is_uid(self.value):
            raise QueryError("malformed", f"the root's {self.kind} reference is not a valid UID")
        return self.value


def similar_query(
    params: Mapping[str, str],
    level: str,
    store: Any,
    k: int,
    fixed: PathReference | None = None,
    depth: int = q.MAX_RESULTS,
) -> tuple[q.SimilarQuery, set[str]]:
    """A QIDO request as the similar query (``k`` results), and the UIDs the answers must match
    (within the first ``depth`` of the ranking, ``Settings.max_results``).

    On the similar root the UID keys name the reference. Under a per-reference root (``fixed``) the
    collection is the reference's ranked list, and every key matches in it as QIDO keys do: the
    returned UID set (``StudyInstanceUID`` / ``SOPInstanceUID`` lists) restricts the answers, which is
    how a viewer opening one of the listed studies finds it there.
    """
    uid_key = "SOPInstanceUID" if level == "IMAGE" else "StudyInstanceUID"
    match: set[str] = set()
    if fixed is None:
        reference, patient_names_reference = _reference(params, level, store)
        uid_keys = {uid_key} if level == "IMAGE" else {"StudyInstanceUID", "AccessionNumber"}
    else:
        reference, patient_names_reference = fixed.resolve(store), False
        uid_keys = {uid_key}
        # lists arrive comma separated, or backslash separated as OHIF writes them
        raw = [u.strip() for u in re.split(r"[,\\]", params.get(uid_key) or "")]
        match = {u for u in raw if u not in {"", "*"}}
        if not all(is_uid(u) for u in match):
            raise QueryError("malformed", f"{uid_key} is not a list of UIDs")
    _refuse_other_matching(params, {*uid_keys, *QIDO_FILTER_KEYS, QIDO_EXCLUDE_KEY, MAX_DISTANCE_KEY})
    filter_params = {k_: v for k_, v in params.items() if k_ in QIDO_FILTER_KEYS or k_ == QIDO_EXCLUDE_KEY}
    if patient_names_reference:
        filter_params.pop("PatientID", None)
    raw_distance = (params.get(MAX_DISTANCE_KEY) or "").strip()
    if raw_distance and not raw_distance.isdigit():
        raise QueryError("malformed", f"{MAX_DISTANCE_KEY} must be an integer >= 0")
    query = q.SimilarQuery(
        level=level,
        reference_uid=reference,
        k=depth if match else k,  # the matching ones may sit anywhere in the ranking
        max_distance=int(raw_distance) if raw_distance else None,
        filters=qido_filters(filter_params),
    )
    return query, match


# -- answers --------------------------------------------------------------------------------------
def _retrieve_url(root: str, study: str, series: str = "", sop: str = "") -> str | None:
    if not root or not study:
        return None
    url = f"{root.rstrip('/')}/studies/{study}"
    if series:
        url += f"/series/{series}"
        if sop:
            url += f"/instances/{sop}"
    return url


def _json(datasets: list[Dataset], headers: dict[str, str] | None = None) -> Response:
    return JSONResponse([ds.to_json_dict() for ds in datasets], media_type=MEDIA_TYPE, headers=headers)


def similar_dataset(result: q.SimilarResult, query: q.SimilarQuery, settings: Any, include: tuple[str, ...],
                    model_version: str, route: str = "") -> Dataset:  # fmt: skip
    """One QIDO answer: the C-FIND similar answer (one builder for both protocols), as DICOM JSON wants."""
    keys = STUDY_KEYS + (INSTANCE_KEYS if query.level == "IMAGE" else ()) + include
    ds = dicom_similar.similar_answer(result, query, keys, settings.ae_title, model_version, route=route)
    del ds.QueryRetrieveLevel  # a C-FIND key, not an attribute of the answer
    series = (result.instance or {}).get("series_uid", "") if query.level == "IMAGE" else ""
    url = _retrieve_url(settings.pacs_wado_root, result.study_uid, series, result.uid if series else "")
    if url:
        ds.RetrieveURL = url
    return ds


def study_dataset(study_uid: str, study: Mapping[str, str], settings: Any) -> Dataset:
    """A plain study answer from its record."""
    ds = Dataset()
    for keyword in STUDY_KEYS:
        if keyword == "StudyInstanceUID":
            value: object = study_uid
        elif keyword == "ModalitiesInStudy":
            value = q.modalities_of(study)
        elif keyword == "NumberOfStudyRelatedInstances":
            value = str(study.get("n_instances", ""))
        else:
            value = study.get(dicom_similar.STUDY_META_KEYS[keyword], "")
        dicom_similar.set_value(ds, keyword, value)
    if dicom_similar.needs_utf8(study.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.RetrieveAETitle = settings.ae_title
    url = _retrieve_url(settings.pacs_wado_root, study_uid)
    if url:
        ds.RetrieveURL = url
    return ds


def _instance_rows(store: Any, study_uid: str, series_uid: str | None) -> list[tuple[str, dict[str, str]]]:
    """(SOP UID, record) of a study's received instances (of one series), in series/instance order."""
    sops = store.records.study_instances(study_uid)
    records = store.records.instances(sops)
    rows = [(sop, r) for sop, r in zip(sops, records, strict=True) if r]
    if series_uid is not None:
        rows = [(sop, r) for sop, r in rows if r.get("series_uid") == series_uid]

    def order(row: tuple[str, dict[str, str]]) -> tuple[int, str, int, str]:
        sop, r = row
        return (_int(r.get("series_number")), r.get("series_uid", ""), _int(r.get("instance_number")), sop)

    return sorted(rows, key=order)


def _int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return 1 << 30


def _instance_dataset(study_uid: str, sop: str, record: Mapping[str, str], settings: Any) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = sop
    for keyword in INSTANCE_KEYS:
        field = dicom_similar.INSTANCE_META_KEYS.get(keyword)
        if field is not None:
            dicom_similar.set_value(ds, keyword, record.get(field, ""))
    url = _retrieve_url(settings.pacs_wado_root, study_uid, record.get("series_uid", ""), sop)
    if url:
        ds.RetrieveURL = url
    return ds


def _series_datasets(study_uid: str, rows: list[tuple[str, dict[str, str]]], settings: Any) -> list[Dataset]:
    by_series: dict[str, list[dict[str, str]]] = {}
    for _, record in rows:
        by_series.setdefault(record.get("series_uid", ""), []).append(record)
    out = []
    for series_uid, records in by_series.items():
        if not series_uid:
            continue
        first = records[0]
        ds = Dataset()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        dicom_similar.set_value(ds, "Modality", first.get("modality", ""))
        dicom_similar.set_value(ds, "SeriesNumber", first.get("series_number", ""))
        ds.NumberOfSeriesRelatedInstances = str(len(records))
        url = _retrieve_url(settings.pacs_wado_root, study_uid, series_uid)
        if url:
            ds.RetrieveURL = url
        out.append(ds)
    return out


def _paged(items: list[Any], reserved: Mapping[str, str], default_limit: int) -> list[Any]:
    limit, offset = _page(reserved, default_limit)
    return items[offset : offset + limit]


# -- routes ---------------------------------------------------------------------------------------
def routes(ctx: Any, renderer: rendered.Renderer) -> list[BaseRoute]:
    """The DICOMweb roots, bound to ``ctx`` (a :class:`plugin.http.app.ApiContext`)."""
    settings = ctx.settings
    store = ctx.store

    def not_acceptable() -> Response:
        return JSONResponse({"error": "answers are application/dicom+json"}, status_code=406)

    def similar_search(level: str, fixed: str | None = None) -> Any:
        """A similar search on the similar root (``fixed`` None) or on a per-reference root."""

        async def handle(request: Request) -> Response:
            if not _accepts_json(request):
                return not_acceptable()
            params, reserved = qido_params(request)
            path = request.path_params
            reference = PathReference(fixed, path["reference"], path.get("patient")) if fixed else None
            try:
                limit, offset = _page(reserved, settings.default_results)
                depth = settings.max_results  # the ranking a site lets one query read
                k = min(offset + limit, depth)
                query, match = await run_in_threadpool(similar_query, params, level, store, k, reference, depth)
                answer = await run_in_threadpool(q.run_similar, query, store, ctx.index)
            except QueryError as err:
                return error_response(err)
            results = [r for r in answer if r.uid in match] if match else list(answer)
            include = _include(reserved)
            answers = [
                similar_dataset(r, query, settings, include, answer.version, answer.route)
                for r in results[offset : offset + limit]
            ]
            fuzzy = (reserved.get("fuzzymatching") or "").strip().lower() == "true"
            return _json(answers, {"Warning": FUZZY_WARNING} if fuzzy else None)

        return handle

    async def plain_studies(request: Request) -> Response:
        if not _accepts_json(request):
            return not_acceptable()
        params, reserved = qido_params(request)

        def find() -> list[Dataset]:
            _refuse_other_matching(params, {"StudyInstanceUID", "AccessionNumber", "PatientID"})
            uids = [u.strip() for u in (params.get("StudyInstanceUID") or "").split(",") if u.strip()]
            accession = (params.get("AccessionNumber") or "").strip()
            if uids:
                if not all(is_uid(u) for u in uids):
                    raise QueryError("malformed", "StudyInstanceUID is not a list of UIDs")
                found = list(zip(uids, store.records.studies(uids), strict=True))
            elif accession:
                found = store.records.studies_by_accession(accession)
            else:
                raise QueryError(
                    "malformed", "this root lists studies by StudyInstanceUID or AccessionNumber; similar"
                    " studies are under /dicom-web/similar/studies",
                )  # fmt: skip
            patient_id = (params.get("PatientID") or "").strip()
            rows = [(u, s) for u, s in found if s and (not patient_id or s.get("patient_id") == patient_id)]
            return [study_dataset(u, s, settings) for u, s in _paged(rows, reserved, q.MAX_RESULTS)]

        try:
            return _json(await run_in_threadpool(find))
        except QueryError as err:
            return error_response(err)

    def drill(kind: str) -> Any:
        async def handle(request: Request) -> Response:
            if not _accepts_json(request):
                return not_acceptable()
            study_uid = request.path_params["study"]
            series_uid = request.path_params.get("series")
            _, reserved = qido_params(request)

            def find() -> list[Dataset]:
                if not is_uid(study_uid) or (series_uid is not None and not is_uid(series_uid)):
                    raise QueryError("malformed", "not a DICOM UID")
                rows = _instance_rows(store, study_uid, series_uid)
                if not rows and not store.records.study(study_uid):
                    raise QueryError("unknown-reference", "no such study here")
                if kind == "series":
                    items = _series_datasets(study_uid, rows, settings)
                else:
                    items = [_instance_dataset(study_uid, sop, r, settings) for sop, r in rows]
                return _paged(items, reserved, q.MAX_RESULTS)

            try:
                return _json(await run_in_threadpool(find))
            except QueryError as err:
                return error_response(err)

        return handle

    browse = [
        Route("/studies/{study}/series", drill("series"), methods=["GET"]),
        Route("/studies/{study}/series/{series}/instances", drill("instances"), methods=["GET"]),
        Route("/studies/{study}/instances", drill("instances"), methods=["GET"]),
        *rendered.routes(renderer),
    ]
    similar_root = [
        Route("/studies", similar_search("STUDY"), methods=["GET"]),
        Route("/instances", similar_search("IMAGE"), methods=["GET"]),
        *browse,
    ]
    study_reference = [Route("/studies", similar_search("STUDY", "study"), methods=["GET"]), *browse]
    accession_reference = [Route("/studies", similar_search("STUDY", "accession"), methods=["GET"]), *browse]
    instance_reference = [Route("/instances", similar_search("IMAGE", "instance"), methods=["GET"]), *browse]
    plain_root = [Route("/studies", plain_studies, methods=["GET"]), *browse]
    # Longest prefixes first: a mount claims every path under it, even one its routes do not answer.
    return [
        Mount("/dicom-web/similar/study/{reference}", routes=study_reference),
        Mount("/dicom-web/similar/accession/{reference}/patient/{patient}", routes=accession_reference),
        Mount("/dicom-web/similar/accession/{reference}", routes=accession_reference),
        Mount("/dicom-web/similar/instance/{reference}", routes=instance_reference),
        Mount("/dicom-web/similar", routes=similar_root),
        Mount("/dicom-web", routes=plain_root),
    ]
