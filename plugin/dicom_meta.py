"""What we keep of a DICOM header: the study and instance fields C-FIND answers and filters need.

Kept in one place so the SCP, the workers and the backfill agree on names. Patient fields are stored
(C-FIND must return them) but never logged: logs carry UIDs only.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

# A DICOM UID: digits and dots, at most 64 characters, no leading zero in a component.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

STUDY_FIELDS = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "study_description": "StudyDescription",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "referring_physician": "ReferringPhysicianName",
    "body_part": "BodyPartExamined",
}

INSTANCE_FIELDS = {
    "series_uid": "SeriesInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "modality": "Modality",
    "series_number": "SeriesNumber",
    "instance_number": "InstanceNumber",
    "body_part": "BodyPartExamined",
}


def is_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(_UID_RE.match(text))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    return str(value).strip()


def study_meta(ds: Dataset) -> dict[str, str]:
    """Study-level fields of one instance's header (empty strings for absent ones)."""
    return {name: _text(ds, kw) for name, kw in STUDY_FIELDS.items()}


def instance_meta(ds: Dataset) -> dict[str, str]:
    return {name: _text(ds, kw) for name, kw in INSTANCE_FIELDS.items()}


def pixel_data_problem(ds: Dataset) -> str | None:
    """Why the pixel data of a received image cannot be complete, or None when it looks whole.

    pydicom accepts a value shorter than the image it describes (a truncated transfer), so the
    C-STORE handler checks the length here: the sender is told at once, instead of a worker failing
    later on a file the PACS believes delivered.
    """
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return None
        return "image object without pixel data"
    data = ds.PixelData
    if data is None or len(data) == 0:
        return "empty pixel data"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return "missing or invalid Rows/Columns/BitsAllocated"
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    encapsulated = bool(transfer_syntax is not None and transfer_syntax.is_encapsulated)
    if not encapsulated:
        pixels = rows * cols * samples * frames
        expected = (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)
        if len(data) < expected:
            return f"pixel data truncated ({len(data)} of {expected} bytes)"
        return None
    # Encapsulated: a sequence of items (FFFE,E000) that must fit the value exactly.
    view = memoryview(data)
    pos = 0
    items = 0
    while pos + 8 <= len(view):
        group = int.from_bytes(view[pos : pos + 2], "little")
        element = int.from_bytes(view[pos + 2 : pos + 4], "little")
        length = int.from_bytes(view[pos + 4 : pos + 8], "little")
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000) or pos + 8 + length > len(view):
            return "compressed pixel data truncated or malformed"
        pos += 8 + length
        items += 1
    if items < 2:  # the basic offset table, then at least one fragment
        return "compressed pixel data has no fragment"
    return None
