"""The similar query, however it was asked: find the reference's code, search the replica, attach records.

:mod:`plugin.dicom.similar` and :mod:`plugin.http.search` parse their requests into a
:class:`SimilarQuery` and turn :class:`SimilarResult` rows into their answers; everything between
is here, once. A reference that is unknown, not indexed yet, or an index that is not loaded raises
:class:`~plugin.search.errors.QueryError` with a reason each protocol maps to its own status.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hashing.bits import pooled_variants
from hashing.search import rerank_shortlist
from plugin.search.errors import QueryError
from plugin.search.filters import Filters
from plugin.search.replica import QUERY_REFRESH_WAIT

log = logging.getLogger("drh.query")

# The most results any similar query may ask for, whatever the settings: a viewer lists them, nobody
# reads 10 000 rows, and each is a pending response on the wire. Settings.max_results (at most
# this) is the bound a site chooses, checked by check_k.
MAX_RESULTS = 1000

# STUDY: study codes; SERIES: series codes (DMIH over a series' images: a CT or MR series by its
# sample of slices); IMAGE: image codes.
LEVELS = ("STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class SimilarQuery:
    level: str  # STUDY, SERIES or IMAGE
    reference_uid: str
    k: int
    max_distance: int | None = None
    filters: Filters = field(default_factory=Filters)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise QueryError("malformed", f"level {self.level!r}: similar is STUDY, SERIES or IMAGE")
        if self.k < 1:
            raise QueryError("malformed", "the number of results must be >= 1")
        if self.k > MAX_RESULTS:
            raise QueryError("malformed", f"k={self.k} is over the maximum of {MAX_RESULTS} results per query")

    @property
    def index_level(self) -> str:
        """The replica that answers: the codes of the query's level."""
        return self.level.lower()


def check_k(query: SimilarQuery, max_results: int) -> None:
    """Refuse a query asking for more than ``max_results`` results (``Settings.max_results``):
    a clear error rather than a silently shorter answer."""
    if query.k > max_results:
        raise QueryError("malformed", f"k={query.k} is over the maximum of {max_results} results per query")


@dataclass(frozen=True)
class SimilarResult:
    """One answer. ``score`` (0-1, higher is more alike) is the re-ranking score, (1 + cosine of the
    re-ranking vectors) / 2, when the model stores them, else 1 - distance / nbits."""

    rank: int
    uid: str
    distance: int
    score: float
    study_uid: str
    study: dict[str, str]
    instance: dict[str, str] | None = None
    reranked: bool = False


class Answer(list):
    """The results of one similar query (a list of :class:`SimilarResult`, nearest first) and who
    answered: the reference's route, the model version and its code width. Every protocol puts the
    route and version in its answer (HTTP fields, a DICOM private element, DICOMweb attributes)."""

    def __init__(
        self, results: list[SimilarResult], route: str, version: str, nbits: int, reranking: dict | None = None
    ) -> None:
        super().__init__(results)
        self.route = route
        self.version = version
        self.nbits = nbits
        self.reranking = reranking  # reranking_of(): how the shortlist was re-sorted, None when it was not


def reranking_of(rerank: Any, k: int) -> dict | None:
    """How an answer's Hamming shortlist was re-sorted, for the answer to say: by the reference's own
    re-ranking vector, or by its query variants (an administrator checks after an upgrade that the
    re-index gave the references their variants)."""
    if rerank is None:
        return None
    if np.ndim(rerank) == 2:
        return {"by": "variants", "variants": int(np.shape(rerank)[0]), "shortlist": rerank_shortlist(k, rerank)}
    return {"by": "reference", "shortlist": rerank_shortlist(k, rerank)}


def route_index(index: Any, uid: str) -> tuple[str, Any, Any] | None:
    """(route, replica, (code, vector)) holding ``uid`` in a routed index (one replica: its own)."""
    if hasattr(index, "locate"):
        return index.locate(uid)
    found = index.lookup(uid)
    return None if found is None else (getattr(index, "route", None) or "", index, found)


def modalities_of(study: Mapping[str, str]) -> list[str]:
    """The modalities of a study record (stored comma separated)."""
    raw = study.get("modalities", "") or ""
    return [m for m in re.split(r"[\\,\s]+", raw) if m]


def study_by_accession(store: Any, accession: str, patient_id: str | None = None) -> str:
    """The StudyInstanceUID an AccessionNumber (with the PatientID, when given) names.

    Viewer forms (Orthanc Explorer, Slicer, most Q/R dialogs) have no StudyInstanceUID field, so a
    radiologist names the reference by its accession number. Accession numbers are unique within
    one issuer only: when several studies carry it, the PatientID must tell them apart.
    """
    studies = store.records.studies_by_accession(accession)
    if patient_id and studies:
        studies = [(u, s) for u, s in studies if s.get("patient_id") == patient_id]
        if not studies:
            raise QueryError("unknown-reference", "no study with that accession number and that PatientID")
    if not studies:
        raise QueryError("unknown-reference", "no study with that accession number")
    if len(studies) > 1:
        raise QueryError("ambiguous-reference", f"{len(studies)} studies have that accession: add PatientID")
    return studies[0][0]


def _reference_study(level: str, uid: str, store: Any) -> tuple[str | None, dict[str, str]]:
    """(study UID, record) of a reference: the study itself, a series' study, or an instance's study."""
    if level == "STUDY":
        return uid, store.records.study(uid)
    if level == "SERIES":
        (study_uid,) = store.records.studies_of_series([uid])
        return study_uid or None, store.records.study(study_uid) if study_uid else {}
    instance = store.records.instance(uid)
    return instance.get("study_uid"), instance


# A study's variants pool at most this many of its images' (a CT study samples its volumes already).
MAX_REFERENCE_IMAGES = 64


def reference_variants(store: Any, version: str, level: str, uid: str, width: int) -> np.ndarray | None:
    """The query variants (:mod:`hashing.variants`) of a stored reference, int8 ``(V, width)``: an
    image's own, or those of a study's or series' images pooled (:func:`hashing.bits.pooled_variants`).
    None when none are stored (a model without a layout path, or images indexed by a version that
    predates them): the query is then re-ranked by the reference's own vector."""
    if level == "STUDY":
        variants = store.embeddings.study_variants(version, uid, width, MAX_REFERENCE_IMAGES)
        return pooled_variants(variants) if variants.shape[1] else None
    if level == "SERIES":
        study_uid, _ = _reference_study(level, uid, store)
        in_study = sorted(store.records.study_instances(study_uid)) if study_uid else []
        records = store.records.instances(in_study)
        sops = [sop for sop, rec in zip(in_study, records, strict=True) if (rec or {}).get("series_uid") == uid]
    else:
        sops = [uid]
    variants = store.embeddings.variants_of(version, sops[:MAX_REFERENCE_IMAGES], width)
    return pooled_variants(variants) if variants.shape[1] else None


# Fetches references' query variants while the replica scans (its kernels release the GIL), so that
# their Redis round trip overlaps the scan: at 1M, p50 of a served search 3.00 against 3.28 ms and
# 3.19 against 3.45 in two interleaved runs (/work/runs/p99c/overlap.py on the development machine).
# A few threads: each concurrent query (SCP and HTTP threads) holds one for one round trip.
_FETCH = ThreadPoolExecutor(max_workers=4, thread_name_prefix="drh-variants")


def fetch_reranking(store: Any, version: str, level: str, uid: str, own: np.ndarray) -> Future[np.ndarray]:
    """What a stored reference is re-ranked by, on its way: its query variants
    (:func:`reference_variants`), or ``own`` (its own re-ranking vector) when none are stored. Pass
    the future to :meth:`plugin.search.replica.ReplicaIndex.search` as ``rerank``."""

    def fetch() -> np.ndarray:
        variants = reference_variants(store, version, level, uid, own.size)
        return own if variants is None else variants

    return _FETCH.submit(fetch)


# A reference received and settled without an index: what the requester is told (a radiologist
# told "unknown reference" concludes the study never arrived; the failure ledger says why).
# (DICOM's ErrorComment keeps 64 characters.)
UNINDEXED = {"failed": "its indexing failed", "ignored": "it is not an image"}
UNINDEXED_SHORT = {"failed": "failed", "ignored": "non-image", "refused": "refused"}


def run_similar(query: SimilarQuery, store: Any, indexes: Mapping[str, Any]) -> Answer:
    """The k nearest studies (or images) to the reference, nearest first, reference excluded,
    searched only among the reference's route (its model's codes)."""
    index = indexes.get(query.index_level)
    if index is None:
        raise QueryError("index-not-ready", "index not ready: try again shortly")
    # Catch up with Redis first (one round trip when nothing changed): what a worker has written
    # before the query arrived is answered, not only what the background refresher has seen; and
    # what was deleted is not. A reload running in another thread is not waited for: the loaded
    # state answers meanwhile.
    try:
        index.refresh(wait=QUERY_REFRESH_WAIT)  # loads the replica the first time
    except Exception as exc:  # noqa: BLE001 - Redis away: answer from the replica we have, if any
        log.warning("replica refresh failed (%s); answering from the replica as it is", type(exc).__name__)
    if not index.ready:
        raise QueryError("index-not-ready", "index not ready: try again shortly")
    located = route_index(index, query.reference_uid)
    excluded = (query.reference_uid,)
    variants_of = query.reference_uid
    if located is None and query.level == "IMAGE":
        # A slice of a volume that was not in its series' sample: its nearest sampled slice answers
        # for it (and, being the same series, is no answer itself).
        representative = store.records.instance(query.reference_uid).get("represented_by") or ""
        if representative:
            located = route_index(index, representative)
            excluded = (query.reference_uid, representative)
            variants_of = representative
    what = {"STUDY": "study", "SERIES": "series"}.get(query.level, "instance")
    if located is None:
        _, known = _reference_study(query.level, query.reference_uid, store)
        if known.get("state") == "no-model":
            raise QueryError("no-model", f"reference {what} is stored but no model serves its modality and body part")
        if known.get("state") in UNINDEXED:
            raise QueryError("not-indexable", f"reference {what} received but {UNINDEXED[known['state']]}")
        if known:
            raise QueryError("not-indexed", f"reference {what} not yet indexed: try again later")
        unindexed = store.records.unindexed(query.reference_uid) if query.level == "STUDY" else {}
        if unindexed and store.ingest.queued_in_study(query.reference_uid)[0]:
            raise QueryError("not-indexed", f"reference {what} not yet indexed: try again later")
        if unindexed:
            told = ", ".join(f"{n} {UNINDEXED_SHORT.get(k, k)}" for k, n in sorted(unindexed.items()))
            raise QueryError("not-indexable", f"reference study received, none indexed: {told}")
        if query.level == "SERIES":  # a series is known once its study is pooled
            raise QueryError("unknown-reference", "unknown reference series, or its study is not pooled yet")
        raise QueryError("unknown-reference", f"unknown reference {what}")

    exclude_patient = None
    if query.filters.exclude_reference_patient:
        reference_study_uid, _ = _reference_study(query.level, query.reference_uid, store)
        exclude_patient = store.records.study(reference_study_uid or "").get("patient_id") or None
    route, route_index_, (code, rerank) = located
    by = None
    if rerank.any():  # a code stored without a vector is not re-ranked
        by = fetch_reranking(store, str(route_index_.version), query.level, variants_of, rerank)
    results = search_code(
        code, query, store, route_index_, exclude_uids=excluded, exclude_patient=exclude_patient, rerank=by
    )
    version, nbits = str(route_index_.version or ""), int(route_index_.nbits or 0)
    return Answer(results, route, version, nbits, reranking_of(None if by is None else by.result(), query.k))


def search_code(
    code: bytes,
    query: SimilarQuery,
    store: Any,
    index: Any,
    *,
    exclude_uids: tuple[str, ...] = (),
    exclude_patient: str | None = None,
    rerank: Any = None,
) -> list[SimilarResult]:
    """The k nearest to ``code`` in ``index`` with the query's filters, as ranked results with records;
    with ``rerank`` (the reference's re-ranking vector, or its variants' ``(V, d)``, or a future of
    either: :func:`fetch_reranking`) the Hamming shortlist is re-ranked by it."""
    hits = index.search(
        code,
        query.k,
        max_distance=query.max_distance,
        filters=query.filters,
        exclude_patient=exclude_patient,
        exclude_uids=exclude_uids,
        rerank=rerank,
    )
    hits = [h for h in hits if h.uid not in exclude_uids]  # never, whatever the index does
    nbits = int(index.nbits)
    instances: list[dict[str, str] | None] = [None] * len(hits)
    if query.level == "STUDY":
        study_uids = [h.uid for h in hits]
    elif query.level == "SERIES":
        study_uids = store.records.studies_of_series([h.uid for h in hits])
    else:
        instances = list(store.records.instances([h.uid for h in hits]))
        study_uids = [(i or {}).get("study_uid", "") for i in instances]
    studies = store.records.studies(study_uids)
    results: list[SimilarResult] = []
    for hit, study_uid, study, instance in zip(hits, study_uids, studies, instances, strict=True):
        if hit.similarity is not None:
            score = (1.0 + hit.similarity) / 2.0
        else:
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
                reranked=hit.similarity is not None,
            )
        )
    return results
