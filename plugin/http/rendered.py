"""WADO-RS thumbnails and rendered frames, drawn by the same display chain as the model's input.

A radiologist comparing a result with the reference should see what the model saw: the pixels come
from :func:`hashing.preprocess.load_pixels` (modality LUT, VOI LUT or window, MONOCHROME1 inverted)
and a thumbnail is :func:`hashing.resize.model_input` at thumbnail size (fitted, aspect kept, padded
with black, 256 grey levels). A ``rendered`` frame is the same image at full size, or fitted into the
``viewport`` asked for.

Where the pixels come from: the spool, for the instances drh-pacs holds (the path its record names,
else where the SCP writes it; never a file outside the spool directory); else the PACS, fetched
from Orthanc's REST API (``Settings.orthanc_url``) by SOPInstanceUID and drawn here the same way.

Rendered images are cached on disk under ``data_dir/cache/rendered`` (``Settings.render_cache_mb``,
least recently used first out): a result list shows the same thumbnails over and over, and decoding a
radiograph costs far more than reading a small JPEG. Renders run at most ``cpu_count`` at a time, so
a page asking for sixty thumbnails at once does not hold sixty decoded radiographs in memory (and at
most ``MAX_CONCURRENT_RENDERS`` on a large server).

Routes (under each DICOMweb root, see :mod:`plugin.http.dicomweb`)::

    studies/{study}/thumbnail
    studies/{study}/series/{series}/thumbnail
    studies/{study}/series/{series}/instances/{sop}/thumbnail | rendered
    studies/{study}/series/{series}/instances/{sop}/frames/{frame}/thumbnail | rendered

``Accept`` (or the ``accept`` query parameter) picks ``image/jpeg`` (default) or ``image/png``;
``viewport=W,H`` sizes the image, ``quality`` (1-100) the JPEG.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from plugin.core.header import is_uid
from plugin.core.settings import Settings

log = logging.getLogger("drh.rendered")

THUMBNAIL_SIZE = 192
# Renders at once, at most (and at most one per core): a decoded radiograph and its intermediates
# take a few hundred MB, a result page asks for dozens of thumbnails at once.
MAX_CONCURRENT_RENDERS = 4
MAX_VIEWPORT = 4096
DEFAULT_QUALITY = 90
FORMATS = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}
# Bumped when the drawing changes, so that a cache written by an older version is not served.
RENDER_VERSION = "1"


class RenderError(Exception):
    """Why an image cannot be drawn; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class RenderRequest:
    study_uid: str
    series_uid: str
    sop_uid: str
    kind: str  # "thumbnail" or "rendered"
    frame: int | None  # 0-based; None: the middle frame (as the model reads multi-frame objects)
    fmt: str  # "jpeg" or "png"
    viewport: tuple[int, int] | None
    quality: int

    def cache_key(self) -> str:
        text = "|".join(
            [RENDER_VERSION, self.sop_uid, self.kind, str(self.frame), self.fmt, str(self.viewport), str(self.quality)]
        )
        return hashlib.sha256(text.encode()).hexdigest()


def to_image_bytes(pixels: np.ndarray, fmt: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """A 2-D image in [0, 1] (or uint8) as JPEG or PNG bytes (8-bit grey)."""
    from PIL import Image

    if pixels.dtype != np.uint8:
        pixels = np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = io.BytesIO()
    image = Image.fromarray(pixels, mode="L")
    if fmt == "png":
        image.save(out, format="PNG", optimize=False)
    else:
        image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def thumbnail_of(image: np.ndarray, size: int = THUMBNAIL_SIZE) -> np.ndarray:
    """The model's input drawn at thumbnail size (uint8): what a result row shows."""
    from hashing.resize import model_input

    return model_input(image, size)


def _fit(image: np.ndarray, viewport: tuple[int, int]) -> np.ndarray:
    """``image`` scaled to fit in ``viewport`` (width, height), aspect kept, never enlarged past 4x."""
    from PIL import Image

    h, w = image.shape
    scale = min(viewport[0] / w, viewport[1] / h, 4.0)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


class DiskCache:
    """Files named by key under one folder, at most ``limit`` bytes; a hit refreshes its time."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self._lock = threading.Lock()
        self._size: int | None = None  # measured on first write

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / key

    def get(self, key: str) -> bytes | None:
        if self.limit <= 0:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return data

    def put(self, key: str, data: bytes) -> None:
        if self.limit <= 0 or len(data) > self.limit:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # a full disk must not break the page: draw without caching
            log.warning("render cache: cannot write (%s)", exc)
            return
        with self._lock:
            if self._size is None:
                self._size = sum(f.stat().st_size for f in self._files())
            else:
                self._size += len(data)
            if self._size > self.limit:
                self._evict()

    def _files(self) -> list[Path]:
        return [p for p in self.folder.glob("??/*") if not p.name.startswith(".tmp-")]

    def _evict(self) -> None:
        """Remove the least recently used files until the cache holds 80 % of its limit."""
        entries = []
        for path in self._files():
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, path))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        target = int(self.limit * 0.8)
        for _, size, path in entries:
            if total <= target:
                break
            path.unlink(missing_ok=True)
            total -= size
        self._size = total


class Renderer:
    """Draws thumbnails and frames of instances from the spool or the PACS, with a disk cache."""

    def __init__(self, settings: Settings, store: Any) -> None:
        self.settings = settings
        self.store = store
        self.spool_root = settings.spool_dir.resolve()
        self.cache = DiskCache(settings.data_dir / "cache" / "rendered", settings.render_cache_mb * 2**20)
        self._slots = threading.BoundedSemaphore(max(1, min(os.cpu_count() or 1, MAX_CONCURRENT_RENDERS)))

    # -- where the pixels are --------------------------------------------------------------------
    def _spooled(self, study_uid: str, sop_uid: str) -> Path | None:
        candidates = []
        try:
            record = self.store.records.instance(sop_uid)
        except Exception:  # noqa: BLE001 - Redis away: the spool layout still tells where the file is
            record = {}
        if record.get("path"):
            candidates.append(Path(record["path"]))
        study = record.get("study_uid") or study_uid
        if is_uid(study):
            candidates.append(self.settings.spool_dir / study / f"{sop_uid}.dcm")
        for candidate in candidates:
            path = candidate.resolve()
            if path.is_relative_to(self.spool_root) and path.is_file():
                return path
        return None

    def _from_pacs(self, sop_uid: str) -> bytes:
        """The instance's file from Orthanc's REST API (found by SOPInstanceUID)."""
        if not self.settings.orthanc_url:
            raise RenderError(404, "instance not held here, and no PACS configured (DRH_ORTHANC_URL)")
        from apiron import Timeout

        from plugin.ops.orthanc import rest_client

        s = self.settings
        client = rest_client(s.orthanc_url, s.orthanc_user, s.orthanc_password)
        try:
            # /tools/find, not /tools/lookup: the client JSON-quotes a lookup's body, which Orthanc
            # then matches against nothing.
            query = {"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}}
            ids = client.find(query, timeout_spec=Timeout(5, 30)) or []
            if not ids:
                raise RenderError(404, "instance neither held here nor in the PACS")
            return b"".join(client.get_instance_file(ids[0], timeout_spec=Timeout(5, 60)))
        except RenderError:
            raise
        except Exception as exc:  # noqa: BLE001 - requests/apiron raise many kinds
            raise RenderError(502, f"the PACS did not answer ({type(exc).__name__})") from exc

    # -- drawing ---------------------------------------------------------------------------------
    def render(self, req: RenderRequest) -> tuple[bytes, str]:
        """(image bytes, where they came from: "cache", "spool" or "pacs"). Raises RenderError."""
        key = req.cache_key()
        cached = self.cache.get(key)
        if cached is not None:
            return cached, "cache"
        with self._slots:
            cached = self.cache.get(key)  # drawn by another request while this one waited
            if cached is not None:
                return cached, "cache"
            path = self._spooled(req.study_uid, req.sop_uid)
            source: Path | bytes = path if path is not None else self._from_pacs(req.sop_uid)
            data = self._draw(req, source)
        self.cache.put(key, data)
        return data, "spool" if path is not None else "pacs"

    def _draw(self, req: RenderRequest, source: Path | bytes) -> bytes:
        from hashing.preprocess import PreprocessError, load_pixels, read_dataset

        try:
            image = load_pixels(read_dataset(source), req.frame)
        except ValueError as exc:  # a frame number the object does not have
            raise RenderError(404, str(exc)) from exc
        except PreprocessError as exc:
            log.warning("cannot draw %s: %s", req.sop_uid, getattr(exc, "code", type(exc).__name__))
            raise RenderError(422, f"not drawable: {exc}") from exc
        if req.kind == "thumbnail":
            size = min(req.viewport) if req.viewport else THUMBNAIL_SIZE
            pixels: np.ndarray = thumbnail_of(image, size)
        else:
            pixels = _fit(image, req.viewport) if req.viewport else image
        return to_image_bytes(pixels, req.fmt, req.quality)

    def representative(self, study_uid: str, series_uid: str | None = None) -> tuple[str, str]:
        """(series, SOP) of the image that stands for a study or series: the first series' middle
        instance, by series and instance number, among the images drh-pacs received (not the
        non-image objects it ignored, nor the files that failed)."""
        sops = self.store.records.study_instances(study_uid)
        records = self.store.records.instances(sops)
        rows = [
            (_number(r.get("series_number")), r.get("series_uid", ""), _number(r.get("instance_number")), sop)
            for sop, r in zip(sops, records, strict=True)
            if r
            and r.get("state", "") not in {"ignored", "failed"}  # received images, indexed or on their way
            and (series_uid is None or r.get("series_uid") == series_uid)
        ]
        if not rows:
            raise RenderError(404, "no image of that study or series here")
        rows.sort()
        first_series = rows[0][1]
        series_rows = [r for r in rows if r[1] == first_series]
        chosen = series_rows[len(series_rows) // 2]
        return chosen[1], chosen[3]


def _number(value: Any) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return 1 << 30  # unnumbered ones last


def _format(request: Request) -> str:
    """JPEG unless the client asks for PNG (``Accept`` or ``accept=``); 406 for anything else."""
    asked = request.query_params.get("accept") or request.headers.get("accept") or "*/*"
    for part in asked.split(","):
        media = part.split(";")[0].strip().lower()
        if media in FORMATS:
            return FORMATS[media]
        if media in {"*/*", "image/*", ""}:
            return "jpeg"
    raise RenderError(406, "rendered images are image/jpeg or image/png")


def _viewport(request: Request) -> tuple[int, int] | None:
    raw = request.query_params.get("viewport")
    if not raw:
        return None
    parts = raw.split(",")
    try:
        width, height = int(parts[0]), int(parts[1] if len(parts) > 1 and parts[1] else parts[0])
    except ValueError:
        raise RenderError(400, "viewport is W,H in pixels") from None
    if not (0 < width <= MAX_VIEWPORT and 0 < height <= MAX_VIEWPORT):
        raise RenderError(400, f"viewport sides are 1 to {MAX_VIEWPORT} pixels")
    return width, height


def _quality(request: Request) -> int:
    raw = request.query_params.get("quality")
    if not raw:
        return DEFAULT_QUALITY
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise RenderError(400, "quality is 1 to 100")
    return int(raw)


def _frame(raw: str | None) -> int | None:
    if raw is None:
        return None
    if "," in raw:
        raise RenderError(400, "one frame at a time")
    if not raw.isdigit() or int(raw) < 1:
        raise RenderError(400, "frame numbers start at 1")
    return int(raw) - 1


def routes(renderer: Renderer) -> list[Route]:
    """The WADO-RS rendering routes, relative to a DICOMweb root (mounted by :mod:`plugin.http.dicomweb`)."""

    def handler(kind: str, level: str) -> Any:
        async def handle(request: Request) -> Response:
            p = request.path_params
            try:
                uids = [p.get("study", ""), p.get("series", ""), p.get("sop", "")]
                if not all(is_uid(u) for u in uids if u):
                    raise RenderError(400, "not a DICOM UID")
                fmt, viewport, quality = _format(request), _viewport(request), _quality(request)
                study, series, sop = uids
                if level != "instance":
                    series, sop = await run_in_threadpool(renderer.representative, study, series or None)
                req = RenderRequest(study, series, sop, kind, _frame(p.get("frame")), fmt, viewport, quality)
                data, origin = await run_in_threadpool(renderer.render, req)
            except RenderError as err:
                return JSONResponse({"error": err.reason}, status_code=err.status)
            headers = {"Cache-Control": "private, max-age=3600", "X-DRH-Rendered-From": origin}
            return Response(data, media_type=f"image/{fmt}", headers=headers)

        return handle

    instance = "/studies/{study}/series/{series}/instances/{sop}"
    return [
        Route("/studies/{study}/thumbnail", handler("thumbnail", "study"), methods=["GET"]),
        Route("/studies/{study}/series/{series}/thumbnail", handler("thumbnail", "series"), methods=["GET"]),
        Route(instance + "/thumbnail", handler("thumbnail", "instance"), methods=["GET"]),
        Route(instance + "/rendered", handler("rendered", "instance"), methods=["GET"]),
        Route(instance + "/frames/{frame}/thumbnail", handler("thumbnail", "instance"), methods=["GET"]),
        Route(instance + "/frames/{frame}/rendered", handler("rendered", "instance"), methods=["GET"]),
    ]
