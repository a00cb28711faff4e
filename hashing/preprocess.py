"""DICOM pixels to the model's input: a 2-D float32 image in [0, 1] where higher is brighter.

The model only ever sees what a radiologist would see on a viewer's default display, so the chain is
the display chain of PS3.3 C.11 / PS3.4 N: stored values -> modality LUT or rescale (physical units
such as HU) -> VOI LUT or window (the vendor's chosen contrast) -> MONOCHROME1 / INVERSE presentation
inverted, so that bone is bright in every image whatever the modality wrote.

Decisions, so that workers and training agree:

- Window: the first VOI LUT of the VOI LUT Sequence when present (it is the vendor's tuned, often
  non-linear, display curve of CR/DX), else the first Window Center/Width pair with its VOI LUT
  Function, else a robust full-range fallback (0.5th to 99.5th percentile of the modality values).
  A window that saturates nearly the whole frame or squeezes it into a sliver of grey (a header that
  does not belong to these pixels) falls back the same way, except for projection radiographs
  whose window misses the pixels altogether: those are refused, since their polarity is in doubt.
  Enhanced multi-frame objects take rescale and window from the frame's functional groups.
- Colour (RGB, YBR_*, PALETTE COLOR) is converted to luminance (ITU-R BT.601 weights) rather than
  refused: ultrasound and secondary captures are part of a study, and DMIH pools over the study.
- Multi-frame: :func:`load_pixels` decodes only one frame (the middle one unless told), which is
  representative of a cine loop or volume and keeps memory flat; :func:`load_frames` gives them all.
- Refusals carry a short machine-friendly ``code`` and a human ``reason`` that never includes patient
  data (only header facts such as transfer syntax, photometric interpretation, sizes, windows).

:class:`NotAnImage` (valid DICOM, not to be indexed; the worker records it as ignored):
``no_pixel_data``, ``structured_report``, ``key_object_selection``, ``presentation_state``,
``segmentation``, ``non_image_object`` (raw data, registration), ``rt_dose``, ``rt_object``,
``parametric_map``, ``encapsulated_document``, ``waveform``, ``float_pixel_data``, ``too_small``,
``for_processing`` (raw DX/MG/IO detector data: the FOR PRESENTATION copy is the one indexed),
``whole_slide_microscopy``.

:class:`DecodeError` (should be an image, is not; the worker records a failure, retried only when
``transient``): transient ``file_not_found``, ``io_error``, ``out_of_memory``; permanent
``not_dicom``, ``truncated_file``, ``malformed_dataset``, ``missing_pixel_data`` (an image SOP
class without pixels: a cut or stripped file), ``bad_pixel_module``,
``unsupported_photometric``, ``missing_transfer_syntax``, ``unsupported_transfer_syntax``,
``decoder_unavailable``, ``truncated_pixel_data``, ``corrupt_pixel_data``, ``bad_palette``,
``bad_modality_lut``, ``window_outside_data`` (a radiograph whose window misses its pixels),
``bad_shape``, ``non_finite``, ``blank_image``.

``drh-pacs decode-check DIR`` runs the same code on a folder and says, per file, what came out.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID_dictionary,
)

# Smallest side (pixels) of an image worth indexing; below it the model sees only interpolation.
MIN_SIDE = 16
# A frame whose values span less than this (on the [0, 1] scale) is blank.
MIN_RANGE = 1.0 / 1024
# A window that puts more than this fraction of pixels at one extreme is inconsistent with the data.
MAX_SATURATED = 0.98
# A window must spread the bulk of the data (see FALLBACK_PERCENTILES) over at least this much of
# [0, 1]; less means the header's window does not belong to these pixels (a copied or fake header).
MIN_WINDOW_SPAN = 0.1
# Robust full-range fallback when there is no usable window: these percentiles map to 0 and 1.
FALLBACK_PERCENTILES = (0.5, 99.5)
# Projection radiography: a window that misses the pixels altogether is refused, not guessed around.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RG", "RF", "XA", "PX", "IO"})
# Decoder plugin tried first when several can handle a transfer syntax.
PREFERRED_PLUGIN = "pylibjpeg"
# Plugins never used: python-gdcm aborts the whole process (an uncaught C++ gdcm::Exception ->
# std::terminate) on some corrupt JPEG streams, which would kill a worker on one bad file.
# Every sample in the project's test corpus decodes without it (pylibjpeg, pillow, pydicom).
UNSAFE_PLUGINS = ("gdcm",)
# ITU-R BT.601 luma weights (what DICOM's YBR_FULL uses).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Deflated Image Frame Compression (PS3.5 A.4.11, 2023): each frame is raw-deflated native pixels.
# pydicom 3.0 has no decoder for it, so we inflate the frames ourselves.
DEFLATED_IMAGE_FRAME = UID("1.2.840.10008.1.2.8.1")

# SOP classes (by UID prefix) whose objects are not pictures of the patient, most specific first.
_NON_IMAGE_SOP: tuple[tuple[str, str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.59", "key_object_selection", "key object selection document"),
    ("1.2.840.10008.5.1.4.1.1.88.", "structured_report", "structured report"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation_state", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.66.4", "segmentation", "segmentation (label map, not an image)"),
    ("1.2.840.10008.5.1.4.1.1.66", "non_image_object", "raw data, registration or fiducials"),
    ("1.2.840.10008.5.1.4.1.1.481.2", "rt_dose", "RT dose grid"),
    ("1.2.840.10008.5.1.4.1.1.481.1", "", ""),  # RT Image is a real (portal) image: allowed
    ("1.2.840.10008.5.1.4.1.1.481.", "rt_object", "RT plan, structure set or record"),
    ("1.2.840.10008.5.1.4.1.1.30", "parametric_map", "parametric map (computed values)"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated_document", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.9.", "waveform", "waveform"),
    ("1.2.840.10008.5.1.4.1.1.77.1.6", "whole_slide_microscopy", "tiled whole-slide image (one tile says nothing)"),
)
# Modalities that never carry a picture to index (used when the SOP class is missing).
_NON_IMAGE_MODALITY = {
    "SR": "structured_report",
    "KO": "key_object_selection",
    "PR": "presentation_state",
    "SEG": "segmentation",
    "RTDOSE": "rt_dose",
    "RTSTRUCT": "rt_object",
    "RTPLAN": "rt_object",
    "RTRECORD": "rt_object",
    "REG": "non_image_object",
    "DOC": "encapsulated_document",
    "ECG": "waveform",
}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}
_MONO = {"MONOCHROME1", "MONOCHROME2"}


class PreprocessError(Exception):
    """Base of the refusals: ``code`` for machines (metrics, failure lists), ``reason`` for people."""

    code: str
    reason: str

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class DecodeError(PreprocessError):
    """The object should be an image but could not be turned into one.

    ``transient`` is True only when retrying the same bytes later can succeed (an I/O error, memory
    pressure); a corrupt file or a missing codec fails the same way every time.
    """

    def __init__(self, reason: str, transient: bool = False, code: str = "decode_failed") -> None:
        super().__init__(code, reason)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles exceptions raised by tasks; keep code and transient across the trip.
        return (type(self), (self.reason, self.transient, self.code))


class NotAnImage(PreprocessError):
    """The object is valid DICOM but not something the model indexes (SR, PR, KO, SEG, RT dose...)."""

    def __init__(self, reason: str, code: str = "not_an_image") -> None:
        super().__init__(code, reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.code))


# -- reading -------------------------------------------------------------------------------------


def read_dataset(src: str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO) -> pydicom.Dataset:
    """Read a DICOM object from a path, bytes or a binary file, with or without preamble and meta header.

    Files without a meta header (old or hand-made) get a TransferSyntaxUID inferred from how the
    dataset was encoded, so that pixel decoding works on them like on any other file.
    """
    if isinstance(src, bytes | bytearray | memoryview):
        fp: Any = io.BytesIO(bytes(src))
    elif isinstance(src, str | os.PathLike):
        try:
            fp = open(src, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise DecodeError(f"file not found ({exc.strerror})", transient=True, code="file_not_found") from exc
        except OSError as exc:
            raise DecodeError(f"cannot open file ({exc.strerror})", transient=True, code="io_error") from exc
    else:
        fp = src
    try:
        return _read(fp)
    finally:
        if isinstance(src, str | os.PathLike):
            fp.close()


def _read(fp: Any) -> Dataset:
    start = fp.tell()
    head = fp.read(132)
    fp.seek(start)
    if len(head) < 8:
        raise DecodeError(f"file too short to be DICOM ({len(head)} bytes)", code="not_dicom")
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    if not has_preamble and not _looks_like_raw_dataset(head):
        raise DecodeError("no DICM preamble and no DICOM data element at the start", code="not_dicom")
    try:
        with warnings.catch_warnings(record=True) as caught, _values_unvalidated():
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fp, force=True)
            # Touch every element now, so a garbled header fails here with a clear code rather
            # than deep inside the decoder.
            for _ in ds.iterall():
                pass
            for _ in getattr(ds, "file_meta", None) or ():
                pass
    except OSError as exc:
        if exc.errno is None:
            # pydicom's own parse failures are OSErrors without an errno ("No tag to read at...").
            raise DecodeError(f"file ends or breaks inside the dataset ({_short(exc)})", code="truncated_file") from exc
        why = exc.strerror or type(exc).__name__
        raise DecodeError(f"read failed ({why})", transient=True, code="io_error") from exc
    except MemoryError as exc:
        raise DecodeError("out of memory while reading", transient=True, code="out_of_memory") from exc
    except EOFError as exc:
        raise DecodeError("file ends inside the dataset", code="truncated_file") from exc
    except InvalidDicomError as exc:
        raise DecodeError(f"not a DICOM file ({_short(exc)})", code="not_dicom") from exc
    except Exception as exc:  # pydicom raises many types on garbage; all mean the same thing here
        # Parser messages can quote element values (a name, an ID): drop every quoted part.
        text = re.sub(r"(['\"]).*?\1", "'...'", _short(exc, 400))
        reason = f"malformed dataset ({type(exc).__name__}: {_short(text)})"
        raise DecodeError(reason, code="malformed_dataset") from exc
    # pydicom reads past a premature end of file with a warning; a file cut before its pixel data
    # (or before any element) is truncated, whatever else was readable.
    hit_eof = any("end of file" in str(w.message).lower() for w in caught)
    if hit_eof and "PixelData" not in ds:
        raise DecodeError("file ends before the pixel data", code="truncated_file")
    if len(ds) == 0:
        if len(getattr(ds, "file_meta", None) or ()) > 0:
            raise DecodeError("file ends after the meta header", code="truncated_file")
        raise DecodeError("no data elements", code="not_dicom")
    _ensure_transfer_syntax(ds)
    return ds


_VALIDATION_LOCK = threading.Lock()
_validation_holders = 0
_validation_saved = 0


@contextmanager
def _values_unvalidated() -> Iterator[None]:
    """Read without pydicom's value validation.

    pydicom logs invalid values *with the value* ("Invalid value for VR PN: ..."), which would put
    patient names and IDs in our logs; we have no use for VR validation here. Every element is
    converted inside this block (see ``iterall`` in :func:`_read`), so later accesses do not
    validate either. The setting is process-global: the first reader in switches it off, the last
    one out restores it, so concurrent readers (the HTTP API's thread pool) stay consistent.
    """
    global _validation_holders, _validation_saved
    settings = pydicom.config.settings
    with _VALIDATION_LOCK:
        if _validation_holders == 0:
            _validation_saved = settings.reading_validation_mode
            settings.reading_validation_mode = pydicom.config.IGNORE
        _validation_holders += 1
    try:
        yield
    finally:
        with _VALIDATION_LOCK:
            _validation_holders -= 1
            if _validation_holders == 0:
                settings.reading_validation_mode = _validation_saved


def _looks_like_raw_dataset(head: bytes) -> bool:
    """Whether bytes start like a dataset without preamble: a low group tag, then a VR or a length.

    Only the groups a dataset can start with (meta, identification, patient, acquisition,
    relationship, image pixel) are accepted, so that JPEG, PDF or text files are told apart.
    """
    for byteorder in ("little", "big"):
        group = int.from_bytes(head[0:2], byteorder)
        elem = int.from_bytes(head[2:4], byteorder)
        if group not in (0x0002, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028) or elem > 0x9FFF:
            continue
        vr = head[4:6]
        if len(vr) == 2 and vr.isalpha() and vr.isupper():  # explicit VR
            return True
        length = int.from_bytes(head[4:8], byteorder)  # implicit VR: a sane value length
        if length < 0x10000:
            return True
    return False


def _is_encapsulated(ds: Dataset) -> bool:
    if "PixelData" not in ds:
        return False
    elem = ds["PixelData"]
    if getattr(elem, "is_undefined_length", False):
        return True
    value = elem.value
    return isinstance(value, bytes | bytearray) and bytes(value[:4]) == b"\xfe\xff\x00\xe0"  # Item tag


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a dataset without a TransferSyntaxUID the one its bytes were read with.

    Native pixel data of a dataset built in memory (no original encoding) is little endian.
    Encapsulated pixel data without a transfer syntax is left alone: the codec is unknown and
    :func:`load_pixels` refuses it with ``missing_transfer_syntax``.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    if meta is None:
        ds.file_meta = FileMetaDataset()
    if _is_encapsulated(ds):
        return
    implicit, little = ds.original_encoding
    if implicit is None or implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    elif little:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- what kind of object ---------------------------------------------------------------------------


def check_is_image(ds: Dataset) -> None:
    """Raise :class:`NotAnImage` for objects the model must not index; return silently otherwise."""
    sop = str(ds.get("SOPClassUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    for prefix, code, what in _NON_IMAGE_SOP:
        if sop == prefix or (prefix.endswith(".") and sop.startswith(prefix)) or sop.startswith(prefix + "."):
            if not code:
                break
            raise NotAnImage(f"{what} (SOP class {sop})", code=code)
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if intent == "FOR PROCESSING" or "For Processing" in (UID_dictionary.get(sop) or ("",))[0]:
        # Raw detector data, stored beside the FOR PRESENTATION image that radiologists read;
        # indexing it would add a second, differently processed copy of every such image.
        raise NotAnImage("FOR PROCESSING image (raw detector data, not for display)", code="for_processing")
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in _NON_IMAGE_MODALITY and "PixelData" not in ds:
        raise NotAnImage(f"modality {modality} carries no image", code=_NON_IMAGE_MODALITY[modality])
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise NotAnImage("float pixel data (computed values, not an acquired image)", code="float_pixel_data")
    if "PixelData" not in ds:
        if sop and not _UID_RE.match(sop):
            raise DecodeError("SOP class UID is malformed (a cut or garbled header)", code="malformed_dataset")
        meta_sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
        if _is_image_sop_class(sop) or _is_image_sop_class(meta_sop) or "Rows" in ds or "BitsAllocated" in ds:
            # An image without its pixels is a cut or stripped file: a failure to see, not to ignore.
            what = UID(sop).name if sop else "image pixel module"
            raise DecodeError(f"{what} without pixel data (truncated or stripped)", code="missing_pixel_data")
        what = f"SOP class {sop}" if sop else "no SOP class"
        raise NotAnImage(f"no pixel data ({what})", code="no_pixel_data")
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"):
        if ds.get(keyword) in (None, ""):
            raise DecodeError(f"pixel module lacks {keyword}", code="bad_pixel_module")
    phot = str(ds.PhotometricInterpretation).strip().upper()
    if phot not in _MONO | _COLOUR:
        raise DecodeError(f"photometric interpretation {phot} not supported", code="unsupported_photometric")


_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _is_image_sop_class(sop: str) -> bool:
    """Whether the SOP class is an image storage class ("CT Image Storage", "Digital X-Ray ...")."""
    entry = UID_dictionary.get(sop)
    return bool(entry) and "Image Storage" in entry[0]


def number_of_frames(ds: Dataset) -> int:
    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n = 1
    return max(n, 1)


# -- per-frame display parameters ------------------------------------------------------------------


@dataclass
class _Display:
    """Everything between stored values and the displayed grey level, for one frame."""

    slope: float = 1.0
    intercept: float = 0.0
    modality_lut: Dataset | None = None  # a ModalityLUTSequence item
    voi_lut: Dataset | None = None  # a VOILUTSequence item
    center: float | None = None
    width: float | None = None
    function: str = "LINEAR"
    invert: bool = False


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        if not value:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _display_params(ds: Dataset, frame: int) -> _Display:
    p = _Display()
    # Enhanced multi-frame: the frame's own functional group, then the shared one, then top level.
    sources: list[Dataset] = []
    for seq_kw, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_kw)
        if seq is not None and len(seq) > idx:
            sources.append(seq[idx])
    sources.append(ds)

    def find(seq_keyword: str | None, keyword: str) -> Any:
        for src in sources:
            holder = src
            if seq_keyword and src is not ds:
                inner = src.get(seq_keyword)
                if not inner:
                    continue
                holder = inner[0]
            elif seq_keyword and src is ds:
                holder = ds
            value = holder.get(keyword)
            if value not in (None, ""):
                return value
        return None

    slope = _first(find("PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first(find("PixelValueTransformationSequence", "RescaleIntercept"))
    if slope is not None and slope != 0:
        p.slope = slope
    if intercept is not None:
        p.intercept = intercept
    mlut = ds.get("ModalityLUTSequence")
    if mlut and slope is None and _lut_usable(mlut[0]):
        p.modality_lut = mlut[0]
    voi = find("FrameVOILUTSequence", "VOILUTSequence")
    if voi and _lut_usable(voi[0]):
        p.voi_lut = voi[0]
    p.center = _first(find("FrameVOILUTSequence", "WindowCenter"))
    width = _first(find("FrameVOILUTSequence", "WindowWidth"))
    p.width = width if width is not None and width >= 1 else None
    function = find("FrameVOILUTSequence", "VOILUTFunction")
    if function:
        p.function = str(function).strip().upper()
    phot = str(ds.PhotometricInterpretation).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    p.invert = phot == "MONOCHROME1" or (phot == "MONOCHROME2" and shape == "INVERSE")
    return p


# -- decoding ---------------------------------------------------------------------------------------


def _decode_frame(ds: Dataset, frame: int) -> tuple[np.ndarray, str]:
    """Stored values of one frame (rows, cols) or (rows, cols, 3), and the photometric it is in."""
    text = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    if not text:
        raise DecodeError("compressed pixel data but no transfer syntax", code="missing_transfer_syntax")
    if not _UID_RE.match(text):
        raise DecodeError("transfer syntax UID is malformed", code="malformed_dataset")
    ts = UID(text)
    if ts == DEFLATED_IMAGE_FRAME:
        return _inflate_frame(ds, frame), str(ds.PhotometricInterpretation).strip().upper()
    try:
        decoder = pydicom.pixels.get_decoder(ts)
    except NotImplementedError as exc:
        name = ts.name if ts.is_transfer_syntax else ts
        raise DecodeError(f"transfer syntax {name} not supported", code="unsupported_transfer_syntax") from exc
    usable = [name for name in decoder.available_plugins if name not in UNSAFE_PLUGINS]
    if not decoder.is_available or (decoder.available_plugins and not usable):
        raise DecodeError(
            f"no usable decoder installed for {ts.name} (install the pylibjpeg plugins)",
            code="decoder_unavailable",
        )
    try:
        arr, meta = _run_decoder(decoder, ds, frame)
    except MemoryError as exc:
        raise DecodeError("out of memory while decoding", transient=True, code="out_of_memory") from exc
    except _DecodeFailed as exc:
        low = exc.summary.lower()
        if any(hint in low for hint in ("less than expected", "too short", "insufficient", "truncat")):
            reason = f"pixel data shorter than the header says ({exc.summary})"
            raise DecodeError(reason, code="truncated_pixel_data") from exc
        raise DecodeError(f"{ts.name}: {exc.summary}", code="corrupt_pixel_data") from exc
    phot = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation)).strip().upper()
    return arr, phot


class _DecodeFailed(Exception):
    """Every decoder plugin failed; ``summary`` is the most specific of their messages."""

    def __init__(self, messages: list[str]) -> None:
        specific = [m for m in messages if "does not support" not in m and "NoneType" not in m]
        self.summary = _short((specific or messages or ["unknown decoder failure"])[0], 240)
        super().__init__(self.summary)


def _run_decoder(decoder: Any, ds: Dataset, frame: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Try each plugin in turn, our preferred one (pylibjpeg, a declared dependency) first.

    We loop ourselves rather than let pydicom do it because (1) pydicom logs an ERROR for every
    plugin that cannot handle a stream even when the next one succeeds, which IT staff would read
    as failures, and (2) the Rust plugins (pylibjpeg-rle) *panic* on some corrupt streams, raising
    a BaseException that pydicom does not catch and that would take the worker task down.
    """
    available = [name for name in decoder.available_plugins if name not in UNSAFE_PLUGINS]
    plugins = sorted(available, key=lambda name: name != PREFERRED_PLUGIN)
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in plugins or [""]:  # native transfer syntaxes have no plugins
            try:
                return decoder.as_array(ds, index=frame, raw=False, decoding_plugin=name)
            except (MemoryError, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: B036 - a Rust panic is a BaseException
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
                if lines[0].startswith("Unable to decode") and len(lines) > 1:
                    first = lines[1]  # pydicom's wrapper; the next line is "<plugin>: <the reason>"
                else:
                    first = f"{name}: {lines[0]}" if name else lines[0]
                messages.append(first)
                if not name or "less than expected" in first:
                    break  # the same check runs before any plugin: no point trying the others
    raise _DecodeFailed(messages)


def _inflate_frame(ds: Dataset, frame: int) -> np.ndarray:
    from pydicom.encaps import generate_frames

    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel)
    bits = int(ds.BitsAllocated)
    nframes = number_of_frames(ds)
    try:
        data = next(iter(_nth(generate_frames(ds.PixelData, number_of_frames=nframes), frame)))
        raw = zlib.decompress(data, -15)
    except (zlib.error, StopIteration, ValueError) as exc:
        raise DecodeError(f"deflated frame {frame} unreadable ({_short(exc)})", code="corrupt_pixel_data") from exc
    if bits == 1:
        flat = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: rows * cols * spp]
    else:
        dtype = {8: "u1", 16: "u2", 32: "u4"}.get(bits)
        if dtype is None:
            raise DecodeError(f"BitsAllocated {bits} not supported", code="bad_pixel_module")
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            dtype = dtype.replace("u", "i")
        flat = np.frombuffer(raw, np.dtype("<" + dtype))[: rows * cols * spp]
    if flat.size < rows * cols * spp:
        raise DecodeError("deflated frame shorter than Rows x Columns", code="truncated_pixel_data")
    shape = (rows, cols, spp) if spp > 1 else (rows, cols)
    return flat.reshape(shape)


def _nth(it: Iterator[bytes], n: int) -> Iterator[bytes]:
    for i, item in enumerate(it):
        if i == n:
            yield item
            return


# -- from stored values to [0, 1] --------------------------------------------------------------------


def _to_luminance(arr: np.ndarray, phot: str, ds: Dataset) -> np.ndarray:
    """Colour frame (already RGB, or palette indices) -> luminance in [0, 1]."""
    if phot == "PALETTE COLOR":
        try:
            rgb = pydicom.pixels.apply_color_lut(arr, ds)
        except Exception as exc:
            raise DecodeError(f"palette colour lookup failed ({_short(exc)})", code="bad_palette") from exc
        try:
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except (AttributeError, IndexError, TypeError, ValueError):
            bits = 8 * rgb.dtype.itemsize
        if bits > 8 and float(rgb.max()) <= 255:
            bits = 8  # a known quirk: 16-bit descriptors over 8-bit palette entries
        return ((rgb.astype(np.float64) @ LUMA.astype(np.float64)) / float(2**bits - 1)).astype(np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DecodeError(f"{phot} frame has shape {arr.shape}, expected 3 samples", code="bad_pixel_module")
    if phot in ("YBR_FULL", "YBR_FULL_422"):
        # pydicom converts these to RGB while decoding; should one come through unconverted, do it here.
        # (YBR_ICT/YBR_RCT are undone by the JPEG 2000 codec itself.)
        arr = pydicom.pixels.convert_color_space(arr, "YBR_FULL", "RGB")
    bits = int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated)
    top = float(2**bits - 1)
    return (arr.astype(np.float64) @ LUMA.astype(np.float64) / top).astype(np.float32)


def _modality(arr: np.ndarray, p: _Display, ds: Dataset) -> np.ndarray:
    if p.modality_lut is not None:
        holder = Dataset()
        holder.ModalityLUTSequence = [p.modality_lut]
        holder.PixelRepresentation = ds.get("PixelRepresentation", 0)
        holder.BitsStored = ds.get("BitsStored", ds.BitsAllocated)
        try:
            return pydicom.pixels.apply_modality_lut(arr, holder).astype(np.float32)
        except Exception as exc:
            raise DecodeError(f"modality LUT unusable ({_short(exc)})", code="bad_modality_lut") from exc
    out = arr.astype(np.float32)
    if p.slope != 1.0 or p.intercept != 0.0:
        out = (arr.astype(np.float64) * p.slope + p.intercept).astype(np.float32)
    return out


def _lut_usable(item: Dataset | None) -> bool:
    """Whether a Modality/VOI LUT item has a descriptor and data (empty items exist in the wild)."""
    if item is None:
        return False
    desc, data = item.get("LUTDescriptor"), item.get("LUTData")
    try:
        return desc is not None and len(desc) == 3 and data is not None and len(data) > 0
    except TypeError:
        return False


def _apply_voi_lut(values: np.ndarray, item: Dataset, ds: Dataset) -> np.ndarray | None:
    """The VOI LUT applied and normalised to [0, 1]; None when the LUT cannot be used."""
    holder = Dataset()
    holder.VOILUTSequence = [item]
    holder.PixelRepresentation = ds.get("PixelRepresentation", 0)
    holder.BitsStored = ds.get("BitsStored", ds.BitsAllocated)
    try:
        out = np.asarray(pydicom.pixels.processing.apply_voi(np.rint(values).astype(np.int64), holder), np.float64)
        data = item.LUTData
        table = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data, np.float64)
    except Exception:
        return None
    # Normalise by the table's own output span, not its descriptor's bit depth: descriptors often
    # claim 16 bits for 12-bit tables, which would leave the image dark.
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        return None
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window functions, giving [0, 1] instead of the display's bit range."""
    v = values.astype(np.float64)
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (v - center) / width))
    elif function == "LINEAR_EXACT":
        out = (v - center) / width + 0.5
    else:  # LINEAR, and anything unknown
        if width <= 1:
            out = (v >= center - 0.5).astype(np.float64)
        else:
            out = (v - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _full_range(values: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(values, FALLBACK_PERCENTILES)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _usable(img: np.ndarray | None) -> bool:
    """Whether a windowed frame shows the data: not blank, not all clipped, not squeezed into a sliver."""
    if img is None or not np.all(np.isfinite(img)):
        return False
    n = img.size
    if np.count_nonzero(img <= 0.0) / n >= MAX_SATURATED or np.count_nonzero(img >= 1.0) / n >= MAX_SATURATED:
        return False
    lo, hi = np.percentile(img, FALLBACK_PERCENTILES)
    return float(hi - lo) >= MIN_WINDOW_SPAN


def _refuse_disjoint_window(values: np.ndarray, p: _Display, ds: Dataset) -> None:
    """Refuse a radiograph whose window lies wholly outside its pixel values.

    Such a header contradicts its own pixels (seen in the wild: values offset by 32768 and
    inverted against the declared MONOCHROME2), so the polarity it declares cannot be trusted
    either; an inverted radiograph would be indexed as a different picture. Other modalities
    (CT, MR, US...) fall back to the full range: their polarity is not in doubt.
    """
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in PROJECTION_MODALITIES or p.center is None or p.width is None:
        return
    lo, hi = np.percentile(values, FALLBACK_PERCENTILES)
    w_lo, w_hi = p.center - p.width / 2, p.center + p.width / 2
    if w_hi < lo or w_lo > hi:
        raise DecodeError(
            f"{modality} window {p.center:g}/{p.width:g} lies outside the pixel values "
            f"({lo:g}..{hi:g}): header and pixels disagree, polarity unknown",
            code="window_outside_data",
        )


def _grey(arr: np.ndarray, p: _Display, ds: Dataset) -> np.ndarray:
    values = _modality(arr, p, ds)
    img: np.ndarray | None = None
    if p.voi_lut is not None:
        img = _apply_voi_lut(values, p.voi_lut, ds)
        if not _usable(img):
            img = None
    if img is None and p.center is not None and p.width is not None:
        img = _window(values, p.center, p.width, p.function)
        if not _usable(img):
            img = None
            _refuse_disjoint_window(values, p, ds)
    if img is None:
        img = _full_range(values)
    if p.invert:
        img = 1.0 - img
    return img


def _frame_to_image(ds: Dataset, frame: int) -> np.ndarray:
    arr, phot = _decode_frame(ds, frame)
    if phot in _MONO:
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise DecodeError(f"{phot} frame has shape {arr.shape}", code="bad_pixel_module")
        img = _grey(arr, _display_params(ds, frame), ds)
    else:
        img = _to_luminance(arr, phot, ds)
    img = np.ascontiguousarray(np.clip(img, 0.0, 1.0), dtype=np.float32)
    check_sane(img)
    return img


def check_sane(img: np.ndarray) -> None:
    """Refuse what the model must not see: wrong shape, non-finite values, tiny or blank images."""
    if img.ndim != 2:
        raise DecodeError(f"decoded image has {img.ndim} dimensions, expected 2", code="bad_shape")
    if not np.all(np.isfinite(img)):
        raise DecodeError("decoded image has non-finite values", code="non_finite")
    if min(img.shape) < MIN_SIDE:
        raise NotAnImage(f"image of {img.shape[0]}x{img.shape[1]} pixels is too small to index", code="too_small")
    if float(img.max() - img.min()) < MIN_RANGE:
        raise DecodeError(f"decoded image is blank (constant {float(img.mean()):.3f})", code="blank_image")


def _prepare(ds: Dataset) -> int:
    check_is_image(ds)
    _ensure_transfer_syntax(ds)
    return number_of_frames(ds)


def load_pixels(ds: pydicom.Dataset, frame: int | None = None) -> np.ndarray:
    """One frame as float32 2-D in [0, 1], higher is brighter; the middle frame unless ``frame`` is given.

    Raises :class:`NotAnImage` or :class:`DecodeError` (never a bare pydicom or codec exception).
    """
    nframes = _prepare(ds)
    index = nframes // 2 if frame is None else frame
    if not 0 <= index < nframes:
        raise ValueError(f"frame {index} out of range: the object has {nframes} frame(s)")
    return _frame_to_image(ds, index)


def load_frames(ds: pydicom.Dataset) -> list[np.ndarray]:
    """Every frame, each as :func:`load_pixels` would give it."""
    nframes = _prepare(ds)
    return [_frame_to_image(ds, i) for i in range(nframes)]


def fit_to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side is ``size`` (aspect kept, antialiased) and pad to ``size x size`` with 0.

    Squashing a 2:1 image into a square would change the anatomy the model sees, so we pad instead;
    0 is the black of a radiograph's collimated border. The image is centred.
    """
    from PIL import Image

    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    src = np.ascontiguousarray(img, dtype=np.float32)
    if (nh, nw) != (h, w):
        resized = Image.fromarray(src).resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
        src = np.asarray(resized, dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.clip(src, 0.0, 1.0)
    return out


def load_file(path: str | os.PathLike[str] | bytes, frame: int | None = None) -> np.ndarray:
    """:func:`read_dataset` then :func:`load_pixels`: the worker's one call."""
    return load_pixels(read_dataset(path), frame)


# -- drh-pacs decode-check ----------------------------------------------------------------------------


def _iter_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower() in {"dicomdir", "inventory.csv"} or name.startswith("."):
                continue
            yield Path(dirpath) / name


def _describe(ds: Dataset) -> dict[str, str]:
    text = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    return {
        "transfer_syntax": UID(text).name if _UID_RE.match(text) else text[:64],
        "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
        "modality": str(ds.get("Modality", "") or ""),
        "frames": str(number_of_frames(ds)) if "PixelData" in ds else "",
    }


def _save_png(img: np.ndarray, path: Path, size: int) -> None:
    from PIL import Image

    sq = fit_to_square(img, size) if max(img.shape) > size else img
    Image.fromarray((np.clip(sq, 0, 1) * 255).round().astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> int:
    """``drh-pacs decode-check DIR``: decode every file under DIR, one line each, then counts per outcome."""
    ap = argparse.ArgumentParser(prog="drh-pacs decode-check", description=main.__doc__)
    ap.add_argument("directory", type=Path)
    ap.add_argument("--csv", type=Path, help="write one row per file here")
    ap.add_argument("--png-dir", type=Path, help="save each decoded image as a PNG preview here")
    ap.add_argument("--png-size", type=int, default=512, help="longest side of the previews (default 512)")
    ap.add_argument("--all-frames", action="store_true", help="decode every frame, not only the middle one")
    args = ap.parse_args(argv)
    if not args.directory.is_dir():
        print(f"decode-check: {args.directory} is not a directory", file=sys.stderr)
        return 2
    if args.png_dir:
        args.png_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    counts: Counter[str] = Counter()
    root = args.directory
    for n, path in enumerate(_iter_files(root)):
        rel = str(path.relative_to(root))
        row = {"path": rel, "outcome": "", "code": "", "detail": "", "transfer_syntax": "", "photometric": ""}
        row |= {"modality": "", "frames": ""}
        try:
            ds = read_dataset(path)
            row |= _describe(ds)
            imgs = load_frames(ds) if args.all_frames else [load_pixels(ds)]
            img = imgs[len(imgs) // 2]
            row["outcome"], row["code"] = "ok", "ok"
            row["detail"] = (
                f"{img.shape[0]}x{img.shape[1]} range=[{img.min():.3f},{img.max():.3f}] mean={img.mean():.3f}"
            )
            if args.png_dir:
                _save_png(img, args.png_dir / f"{n:04d}_{path.stem}.png", args.png_size)
        except NotAnImage as exc:
            row["outcome"], row["code"], row["detail"] = "not_an_image", exc.code, exc.reason
        except DecodeError as exc:
            kind = "transient_error" if exc.transient else "decode_error"
            row["outcome"], row["code"], row["detail"] = kind, exc.code, exc.reason
        counts[f"{row['outcome']}:{row['code']}" if row["outcome"] != "ok" else "ok"] += 1
        rows.append(row)
        print(f"{row['outcome']:<15} {row['code']:<28} {rel}  {row['detail']}", flush=True)
    print()
    print(f"{len(rows)} files")
    for key, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:5d}  {key}")
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["path"])
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
