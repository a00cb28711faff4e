"""What we keep of a DICOM header: the study and instance fields C-FIND answers and filters need.

Kept in one place so the SCP, the workers, the store's records and the backfill agree on names.
Patient fields are stored (C-FIND must return them) but never logged: logs carry UIDs only.
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
    "photometric": "PhotometricInterpretation",  # with modality and body part: what routing reads
}


# What routing reads (hashing.route.Route.matches takes them in this order).
ROUTING_KEYWORDS = ("Modality", "BodyPartExamined", "PhotometricInterpretation")


def routing_header(ds: Dataset | None) -> tuple[str, str, str]:
    """Modality, body part examined and photometric interpretation of a dataset ("" when absent or
    no dataset, e.g. an uploaded picture)."""
    if ds is None:
        return ("", "", "")
    return tuple(str(ds.get(kw, "") or "").strip() for kw in ROUTING_KEYWORDS)  # type: ignore[return-value]


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
