"""What we keep of a DICOM header: the study and instance fields C-FIND answers and filters need.

Kept in one place so the SCP, the workers, the store's records and the backfill agree on names.
Patient fields are stored (C-FIND must return them) but never logged: logs carry UIDs only.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from hashing.route import BODY_PART_SYNONYMS, body_part_term

# A DICOM UID: digits and dots, at most 64 characters. DICOM forbids a leading zero in a component,
# but equipment wrote them (``...1507184833.035541``) and archives keep them: refusing them would keep
# those studies out of search for good. Digits and non-empty components only, so a UID is still a safe
# path component (the spool names files by UID).
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")

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

# The body part routing reads: the defined term of BodyPartExamined (hashing.route.body_part_term),
# else, for a header that names none, its Anatomic Region Sequence code or its descriptions; a chest
# film with neither a body part nor a description that names one still goes to the general model.
# Anatomic Region Sequence codes (scheme, value) of the terms routes use: SNOMED CT and the older SRT.
_REGION_CODES = {
    ("SCT", "51185008"): "CHEST", ("SRT", "T-D3000"): "CHEST", ("SCT", "43799004"): "CHEST",
    ("SCT", "76752008"): "BREAST", ("SRT", "T-04000"): "BREAST",
    ("SCT", "80248007"): "BREAST", ("SCT", "73056007"): "BREAST",
    ("SCT", "818981001"): "ABDOMEN", ("SRT", "T-D4000"): "ABDOMEN",
}  # fmt: skip
# Words of the descriptions that name one of them, read only when the header names no body part:
# each term and its synonyms (hashing.route.BODY_PART_SYNONYMS), and words only descriptions use.
_DESCRIPTION_ONLY = {"BREAST": (r"MAMMO\w*",)}
_DESCRIPTION_WORDS = {
    term: re.compile(r"\b(" + "|".join((term, *aliases, *_DESCRIPTION_ONLY.get(term, ()))) + r")\b")
    for term, aliases in BODY_PART_SYNONYMS.items()
}
DESCRIPTION_KEYWORDS = ("StudyDescription", "SeriesDescription", "ProtocolName")


def routing_body_part(ds: Dataset) -> str:
    """The body part an image's route is chosen by: its BodyPartExamined (as a defined term), else
    the code of its Anatomic Region Sequence, else the one body part its study or series description
    or protocol name names (none when they name two: a guess is worse than the general model)."""
    examined = body_part_term(_text(ds, "BodyPartExamined"))
    if examined:
        return examined
    for item in ds.get("AnatomicRegionSequence", None) or ():
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
        term = _REGION_CODES.get((scheme, str(item.get("CodeValue", "") or "").strip()))
        if term:
            return term
    text = " ".join(_text(ds, kw) for kw in DESCRIPTION_KEYWORDS).upper()
    named = [term for term, words in _DESCRIPTION_WORDS.items() if words.search(text)]
    return named[0] if len(named) == 1 else ""


def routing_header(ds: Dataset | None) -> tuple[str, str, str]:
    """Modality, body part (:func:`routing_body_part`) and photometric interpretation of a dataset
    ("" when absent or no dataset, e.g. an uploaded picture)."""
    if ds is None:
        return ("", "", "")
    return (_text(ds, "Modality"), routing_body_part(ds), _text(ds, "PhotometricInterpretation"))


def recorded_routing(record: dict[str, str]) -> tuple[str, str, str]:
    """What routing reads, from an instance record: the body part routing chose when it arrived
    (``route_body_part``), or, for a record from before it was kept, its BodyPartExamined as a
    defined term (its descriptions were not kept)."""
    body = record.get("route_body_part") or body_part_term(record.get("body_part", ""))
    return (record.get("modality", ""), body, record.get("photometric", ""))


def is_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(_UID_RE.fullmatch(text))


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    return str(value).strip()


def study_meta(ds: Dataset) -> dict[str, str]:
    """Study-level fields of one instance's header (empty strings for absent ones)."""
    return {name: _text(ds, kw) for name, kw in STUDY_FIELDS.items()}


def instance_meta(ds: Dataset) -> dict[str, str]:
    """Instance fields of one header, and the body part its route was chosen by."""
    return {**{name: _text(ds, kw) for name, kw in INSTANCE_FIELDS.items()}, "route_body_part": routing_body_part(ds)}
