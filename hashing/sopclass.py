"""What kind of DICOM object this is: an image to index, a non-image to ignore, or a broken image.

:class:`~hashing.errors.NotAnImage` (valid DICOM, not to be indexed; the worker records it as ignored):
structured reports, key objects, presentation states, segmentations, RT objects, parametric maps,
encapsulated documents, waveforms, float pixel data, FOR PROCESSING raw detector data, whole-slide
tiles. An image SOP class without its pixels is a :class:`~hashing.errors.DecodeError` (a cut file).
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.uid import UID, UID_dictionary

from hashing.errors import DecodeError, NotAnImage

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
COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}
MONO = {"MONOCHROME1", "MONOCHROME2"}


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
        if sop and not UID_RE.match(sop):
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
    if phot not in MONO | COLOUR:
        raise DecodeError(f"photometric interpretation {phot} not supported", code="unsupported_photometric")


UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


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
