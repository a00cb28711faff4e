"""HTTP/JSON similar search, for web viewers and scripts: the same query as the DICOM one.

- ``GET /api/similar/study/{study_uid}``: studies like a stored study (DMIH study codes).
- ``GET /api/similar/series/{series_uid}``: series like a stored series (DMIH series codes: a CT or
  MR series by its sample of slices, a radiograph series by its images).
- ``GET /api/similar/instance/{sop_uid}``: images like a stored image (DRH image codes).
- ``POST /api/similar/upload``: a DICOM file or a picture (multipart field ``file``, or the raw body
  with ``Content-Type: application/dicom``) hashed here, then searched; ``?level=study`` (default: the
  file as a one-image study, against study codes) or ``?level=image``. The answer's ``reference``
  carries a PNG thumbnail (a data URL) of what the model was given, so a page can show it, and the
  file's PatientID, which ``exclude_same_patient`` uses (a picture names no patient: refused). The
  body is streamed to a private temporary file in ``data_dir/tmp`` (python-multipart's parser,
  written to disk as it arrives) and refused (413) once it passes ``Settings.max_upload_size``; at
  most ``Settings.max_concurrent_uploads`` are received and decoded at once (503 with Retry-After
  beyond), so a burst of large uploads cannot exhaust memory.

Query parameters: ``k`` (at most ``Settings.max_results``), ``max_distance``, ``modality``
(repeatable or comma separated), ``date_from``/``date_to`` (YYYYMMDD), ``body_part``,
``patient_id``, ``exclude_same_patient`` (yes or no); any other parameter is refused (400), so that a
misspelt filter is never silently left out.
Refusals are JSON ``{"error": reason, "detail": ...}`` with 400 (malformed), 404 (unknown
reference), 409 (not indexed yet, or the upload's model is not the one answering), 413 (too large),
422 (not a decodable image) or 503 (index not ready). The bearer token is checked by
:mod:`plugin.http.app` for every route here.

The upload is hashed in the API process: the encoder of the version the index answers with is loaded
once, on first use, and shared by requests (inference is serialised by a lock; it is one image).
"""

from __future__ import annotations

import base64
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import File, FormParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from hashing.route import first_match
from plugin.core.header import is_uid, routing_header
from plugin.http.rendered import thumbnail_of, to_image_bytes
from plugin.search import query as q
from plugin.search.errors import QueryError
from plugin.search.filters import Filters
from plugin.search.replica import QUERY_REFRESH_WAIT

log = logging.getLogger("drh.api")

# A busy upload slot: when to try again (seconds), told in Retry-After.
UPLOAD_RETRY_AFTER = 5
# QueryError reason -> HTTP status, for every HTTP route that runs a similar query (JSON and DICOMweb).
HTTP_STATUS = {
    "malformed": 400,
    "unknown-reference": 404,
    "ambiguous-reference": 409,
    "not-indexed": 409,
    "not-indexable": 422,
    "no-model": 409,
    "model-mismatch": 409,
    "too-large": 413,
    "busy": 503,
    "not-an-image": 422,
    "index-not-ready": 503,
}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}
# What a search takes; anything else is refused, so that a misspelt filter (``modalities=CT``) is not
# silently left out of the answer. ``level`` only where an upload names what to search.
SEARCH_PARAMS = (
    "k",
    "max_distance",
    "modality",
    "date_from",
    "date_to",
    "body_part",
    "patient_id",
    "exclude_same_patient",
)


class _Encoders:
    """Encoders by model version, loaded lazily once per process (the model is the expensive part)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._by_version: dict[str, Any] = {}

    def for_version(self, version: str) -> Any:
        with self._lock:
            encoder = self._by_version.get(version)
            if encoder is None:
                from hashing.encoder import Encoder

                path = self.ctx.store.models.details(version).get("path") or self.ctx.settings.model_path or None
                encoder = Encoder.load(path, device=self.ctx.settings.device)
                if encoder.version != version:
                    raise QueryError(
                        "model-mismatch",
                        f"the index answers with model {version}; this process loads {encoder.version}",
                    )
                self._by_version[version] = encoder
            return encoder

    def lock(self) -> threading.Lock:
        return self._lock


def error_response(err: QueryError) -> JSONResponse:
    """A refused query as JSON ``{"error": reason, "detail": ...}`` with the status of its reason; an
    index still loading says when to ask again."""
    headers = {"Retry-After": "5"} if err.reason == "index-not-ready" else None
    return JSONResponse(
        {"error": err.reason, "detail": str(err)}, status_code=HTTP_STATUS.get(err.reason, 400), headers=headers
    )


def _int(params: Any, name: str, minimum: int) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise QueryError("malformed", f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise QueryError("malformed", f"{name} must be >= {minimum}")
    return value


def _flag(params: Any, name: str) -> bool:
    raw = (params.get(name) or "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise QueryError("malformed", f"{name}={raw!r} is not yes or no")


def check_params(params: Any, allowed: tuple[str, ...] = SEARCH_PARAMS) -> None:
    """Refuse a parameter the search does not take, naming the ones it does."""
    unknown = sorted({name for name in params.keys() if name not in allowed})
    if unknown:
        raise QueryError("malformed", f"unknown parameter {', '.join(unknown)}; a search takes {', '.join(allowed)}")


def parse_filters(params: Any) -> Filters:
    """Query parameters -> :class:`Filters` (the HTTP twin of :func:`plugin.dicom.similar.parse_similar`)."""
    modalities: list[str] = []
    for raw in params.getlist("modality"):
        modalities += [m for m in raw.split(",") if m.strip()]
    return Filters(
        modalities=tuple(modalities),
        date_from=(params.get("date_from") or "").strip() or None,
        date_to=(params.get("date_to") or "").strip() or None,
        body_part=(params.get("body_part") or "").strip() or None,
        patient_id=(params.get("patient_id") or "").strip() or None,
        exclude_reference_patient=_flag(params, "exclude_same_patient"),
    )


def _query(
    params: Any, level: str, reference: str, default_k: int, max_k: int, allowed: tuple[str, ...] = SEARCH_PARAMS
) -> q.SimilarQuery:
    check_params(params, allowed)
    if not is_uid(reference):
        raise QueryError("malformed", "the reference is not a valid UID")
    query = q.SimilarQuery(
        level=level,
        reference_uid=reference,
        k=_int(params, "k", 1) or default_k,
        max_distance=_int(params, "max_distance", 0),
        filters=parse_filters(params),
    )
    q.check_k(query, max_k)
    return query


def _study_json(study_uid: str, study: dict[str, str]) -> dict[str, Any]:
    return {
        "study_instance_uid": study_uid,
        "patient_id": study.get("patient_id", ""),
        "patient_name": study.get("patient_name", ""),
        "study_date": study.get("study_date", ""),
        "study_description": study.get("study_description", ""),
        "accession_number": study.get("accession_number", ""),
        "modalities": q.modalities_of(study),
        "body_part": study.get("body_part", ""),
        "number_of_instances": int(study["n_instances"]) if str(study.get("n_instances", "")).isdigit() else None,
    }


def _answer(query: q.SimilarQuery, results: q.Answer, started: float, reference: dict[str, Any]) -> JSONResponse:
    items = []
    for r in results:
        item: dict[str, Any] = {"rank": r.rank, "distance": r.distance, "score": r.score, "reranked": r.reranked}
        if query.level == "IMAGE":
            item["sop_instance_uid"] = r.uid
            item["series_instance_uid"] = (r.instance or {}).get("series_uid", "")
        elif query.level == "SERIES":
            item["series_instance_uid"] = r.uid
        item["study"] = _study_json(r.study_uid, r.study)
        items.append(item)
    return JSONResponse(
        {
            "level": query.level.lower(),
            "reference": reference,
            "route": results.route,
            "model_version": results.version,
            "nbits": results.nbits,
            "reranking": results.reranking,
            "k": query.k,
            "max_distance": query.max_distance,
            "results": items,
            "elapsed_ms": round((time.monotonic() - started) * 1000, 2),
        }
    )


def routes(ctx: Any) -> list[Route]:
    """The similar-search routes, bound to ``ctx`` (a :class:`plugin.http.app.ApiContext`)."""
    encoders = _Encoders(ctx)
    default_k = ctx.settings.default_results
    max_k = ctx.settings.max_results
    uploads = _UploadSlots(ctx.settings.max_concurrent_uploads)

    def by_reference(level: str, param: str, reference_key: str) -> Any:
        """The handler of a search whose reference (a study or an instance UID) is in the path."""

        async def handler(request: Request) -> Response:
            started = time.monotonic()
            uid = request.path_params[param]
            try:
                query = _query(request.query_params, level, uid, default_k, max_k)
                results = await run_in_threadpool(q.run_similar, query, ctx.store, ctx.index)
            except QueryError as err:
                return error_response(err)
            return _answer(query, results, started, {reference_key: uid})

        return handler

    by_study = by_reference("STUDY", "study_uid", "study_instance_uid")
    by_series = by_reference("SERIES", "series_uid", "series_instance_uid")
    by_instance = by_reference("IMAGE", "sop_uid", "sop_instance_uid")

    async def by_upload(request: Request) -> Response:
        started = time.monotonic()
        level = (request.query_params.get("level") or "study").upper()
        if level not in ("STUDY", "IMAGE"):  # an upload is one image: a one-image study, or an image
            return error_response(QueryError("malformed", "level is study or image"))
        try:
            query = _query(request.query_params, level, "1.2", default_k, max_k, (*SEARCH_PARAMS, "level", "route"))
        except QueryError as err:
            return error_response(err)
        if not uploads.take():
            log.warning("upload refused: %d already in progress", uploads.limit)
            response = error_response(QueryError("busy", f"{uploads.limit} uploads in progress: try again shortly"))
            response.headers["Retry-After"] = str(UPLOAD_RETRY_AFTER)
            return response
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=_tmp_dir(ctx.settings)))
        try:
            path = await _receive_upload(request, ctx.settings, folder)
            route = (request.query_params.get("route") or "").strip()
            results, reference = await run_in_threadpool(_search_upload, ctx, encoders, path, query, route)
        except QueryError as err:
            return error_response(err)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # complete or cut off, nothing stays behind
            uploads.release()
        return _answer(query, results, started, reference)

    return [
        Route("/api/similar/study/{study_uid}", by_study, methods=["GET"]),
        Route("/api/similar/series/{series_uid}", by_series, methods=["GET"]),
        Route("/api/similar/instance/{sop_uid}", by_instance, methods=["GET"]),
        Route("/api/similar/upload", by_upload, methods=["POST"]),
    ]


class _UploadSlots:
    """How many uploads are being received or decoded; only touched from the event loop."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0

    def take(self) -> bool:
        if self.busy >= self.limit:
            return False
        self.busy += 1
        return True

    def release(self) -> None:
        self.busy -= 1


def _tmp_dir(settings: Any) -> Path:
    settings.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return settings.tmp_dir


async def _receive_upload(request: Request, settings: Any, folder: Path) -> Path:
    """Stream the upload (the multipart ``file`` field, or the raw body) to a file in ``folder`` (the
    caller removes the folder, whatever happens); refuse it once it is over ``max_upload_size``,
    before reading the rest."""
    limit = settings.max_upload_size
    too_large = QueryError("too-large", f"upload over {limit} bytes (max_upload_size)")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    multipart = content_type == b"multipart/form-data"
    if multipart and not options.get(b"boundary"):
        raise QueryError("malformed", "multipart upload without a boundary")
    files: list[File] = []
    parser = FormParser(
        "multipart/form-data" if multipart else "application/octet-stream",
        on_field=None,
        on_file=files.append,
        boundary=options.get(b"boundary"),
        file_name=b"upload",
        config={
            "UPLOAD_DIR": str(folder),
            "MAX_MEMORY_FILE_SIZE": 0,  # straight to disk
            "UPLOAD_DELETE_TMP": False,  # the folder goes as a whole
            "MAX_FIELDS": 16,
            "MAX_FIELD_SIZE": 64 * 1024,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise QueryError("malformed", f"unreadable multipart upload: {exc}") from exc
    finally:
        for f in files:
            f.close()
    wanted = [f for f in files if not multipart or f.field_name == b"file"]
    if not wanted:
        raise QueryError("malformed", "multipart upload without a 'file' field")
    if wanted[0].size == 0 or not wanted[0].actual_file_name:
        raise QueryError("malformed", "empty upload")
    return Path(wanted[0].actual_file_name.decode())


def upload_pixels(source: bytes | Path) -> tuple[Dataset | None, Any]:
    """An uploaded DICOM file or picture as (dataset or None, the image the model input is made from),
    through :mod:`hashing.preprocess`, the workers' pixel path. A DICOM file on disk is read from
    there (the file is never copied into memory first); other uploads (pictures, DICOM without a
    preamble) through :func:`hashing.preprocess.load_bytes`."""
    from hashing.preprocess import PreprocessError, load_bytes, load_pixels, read_dataset

    try:
        if isinstance(source, bytes):
            return load_bytes(source)
        with open(source, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            ds = read_dataset(source)
            return ds, load_pixels(ds)
        return load_bytes(source.read_bytes())
    except PreprocessError as err:
        raise QueryError("not-an-image", f"cannot use the upload: {err}") from err
    except Exception as err:  # noqa: BLE001 - anything pydicom raises on a non-DICOM upload
        raise QueryError("not-an-image", f"not a readable DICOM file or picture ({type(err).__name__})") from err


def _upload_route(ctx: Any, ds: Any, routed: Any, filters: Filters, asked: str = "") -> tuple[str, Any]:
    """(route, replica) that answers for an upload: the route named by the caller (``route``: a
    picture says nothing of its kind, and the person who dropped it knows), else the route its
    header takes. A picture without ``route`` has no header: the modality and body part the query
    filters on stand for it, else it goes where an image of unknown kind goes (the general route),
    else to the only route there is."""
    routes = ctx.store.models.matching(ctx.settings.unrouted)  # as the workers route a stored image
    if asked:
        found = next((r for r in routes if r.name == asked), None)
        if found is None:
            names = ", ".join(r.name for r in routes) or "none"
            raise QueryError("malformed", f"no model answers for route {asked!r} (answering: {names})")
    else:
        header = routing_header(ds)
        if ds is None:
            modality = filters.modalities[0] if filters.modalities else ""
            header = (modality, filters.body_part or "", "")
        found = first_match(routes, *header)
        if found is None and ds is None and len(routes) == 1:
            found = routes[0]
    if found is None:
        raise QueryError("no-model", "no model serves this kind of image (its modality and body part)")
    route = found.name
    index = routed.for_route(route) if hasattr(routed, "for_route") else routed
    if index is None or not index.ready:
        raise QueryError("index-not-ready", "index not ready: try again shortly")
    return route, index


def _search_upload(
    ctx: Any, encoders: _Encoders, path: Path, query: q.SimilarQuery, route: str = ""
) -> tuple[q.Answer, dict[str, Any]]:
    """Decode, hash with the model of the upload's route, search that route; the upload's own
    study/image is left out."""
    ds, image = upload_pixels(path)
    study_uid = str(ds.get("StudyInstanceUID", "") or "") if ds is not None else ""
    sop_uid = str(ds.get("SOPInstanceUID", "") or "") if ds is not None else ""
    patient_id = str(ds.get("PatientID", "") or "").strip() if ds is not None else ""
    if query.filters.exclude_reference_patient and not patient_id:
        raise QueryError("malformed", "exclude_same_patient needs a DICOM file with a PatientID")
    level = query.index_level
    routed = ctx.index.get(level)
    if routed is None:
        raise QueryError("index-not-ready", "index not ready: try again shortly")
    routed.refresh(wait=QUERY_REFRESH_WAIT)
    route, index = _upload_route(ctx, ds, routed, query.filters, route)
    encoder = encoders.for_version(str(index.version))
    with encoders.lock():
        out = encoder.encode_images([image])
        if level == "study":
            study_code, rerank = encoder.encode_study(out.embeddings)
            code = bytes(study_code)
        else:
            code, rerank = bytes(out.codes[0]), out.rerank[0]
        if out.variants.shape[1]:  # one image: its variants are its study's too (hashing.bits.pooled_variants)
            rerank = out.variants[0]
    own = study_uid if level == "study" else sop_uid
    results = q.search_code(
        code,
        query,
        ctx.store,
        index,
        exclude_uids=(own,) if own else (),
        exclude_patient=patient_id if query.filters.exclude_reference_patient else None,
        rerank=rerank,
    )
    results = q.Answer(results, route, str(index.version), int(index.nbits or 0), q.reranking_of(rerank, query.k))
    thumbnail = base64.b64encode(to_image_bytes(thumbnail_of(image), "png")).decode()
    reference = {
        "study_instance_uid": study_uid,
        "sop_instance_uid": sop_uid,
        "patient_id": patient_id,
        "code": code.hex(),
        "thumbnail": "data:image/png;base64," + thumbnail,
    }
    return results, reference
