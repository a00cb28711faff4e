"""The filters of a similar query: one type, whichever way the query arrived (DICOM or HTTP).

A filter restricts the *study* attributes of what is returned (for image search, the image's study).
Dates are DICOM ``YYYYMMDD``, inclusive; ``modalities``: the study has at least one of them. The
reference patient to exclude is resolved at search time (:func:`plugin.search.query.run_similar`),
since a request names it only indirectly.

Adding a filter key: a field here, its test in :mod:`plugin.search.eligible` (and, for a new study
attribute, a field of the record in :mod:`plugin.store.attributes`), and its parsers:
:func:`plugin.dicom.similar.parse_similar`, :func:`plugin.http.search.parse_filters` and
:func:`qido_filters` here (DICOMweb's matching parameters, :mod:`plugin.http.dicomweb`).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass

from plugin.search.errors import QueryError

_DATE_RE = re.compile(r"^\d{8}$")


def _is_date(value: str) -> bool:
    """A DICOM DA that names a day of the calendar: ``20201345`` has eight digits but would match by
    its number as if it were a date, so a range with it would answer without saying why."""
    if not _DATE_RE.match(value):
        return False
    try:
        datetime.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Filters:
    modalities: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
    body_part: str | None = None
    patient_id: str | None = None
    exclude_reference_patient: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(sorted({m.strip().upper() for m in self.modalities if m.strip()})))
        if self.body_part:
            object.__setattr__(self, "body_part", self.body_part.strip().upper() or None)
        for name in ("date_from", "date_to"):
            value = getattr(self, name)
            if value and not _is_date(value):
                raise QueryError("malformed", f"{name} {value!r} is not a date YYYYMMDD")
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise QueryError("malformed", "the date range ends before it starts")

    def restricts(self) -> bool:
        """Whether any filter on the studies' own attributes is set (the patient exclusion aside)."""
        return bool(self.modalities or self.date_from or self.date_to or self.body_part or self.patient_id)


def parse_date_range(value: str) -> tuple[str | None, str | None]:
    """``YYYYMMDD``, ``YYYYMMDD-``, ``-YYYYMMDD`` or ``YYYYMMDD-YYYYMMDD`` -> (from, to), inclusive."""
    value = value.strip()
    if not value:
        return None, None
    if "-" in value:
        start, _, end = value.partition("-")
        start, end = start.strip(), end.strip()
        if (start and not _is_date(start)) or (end and not _is_date(end)) or not (start or end):
            raise QueryError("malformed", f"StudyDate range {value!r} is not YYYYMMDD-YYYYMMDD")
        if start and end and start > end:
            raise QueryError("malformed", f"StudyDate range {value!r} ends before it starts")
        return start or None, end or None
    if not _is_date(value):
        raise QueryError("malformed", f"StudyDate {value!r} is not a date YYYYMMDD")
    return value, value


# QIDO-RS matching attributes (PS3.18 8.3.4) that are filters, by keyword; the private one is named by
# its keyword in our private dictionary (plugin.dicom.status). PatientID is a filter unless it names
# the reference's patient (an AccessionNumber reference), which the caller decides.
QIDO_FILTER_KEYS = ("ModalitiesInStudy", "Modality", "StudyDate", "BodyPartExamined", "PatientID")
QIDO_EXCLUDE_KEY = "DRHExcludeReferencePatient"
_YES = {"YES", "Y", "TRUE", "1"}
_NO = {"", "NO", "N", "FALSE", "0"}


def _single(keyword: str, value: str) -> str | None:
    """A single-valued matching value: None for universal matching (empty or ``*``); wildcards
    and lists refused rather than silently read as literal text."""
    value = value.strip()
    if value in {"", "*"}:
        return None
    if any(c in value for c in "*?,\\"):
        raise QueryError("malformed", f"{keyword}: only single-value matching is supported here")
    return value


def qido_filters(params: Mapping[str, str]) -> Filters:
    """QIDO-RS matching parameters (keyword -> value, tags already turned into keywords) -> Filters.

    ``ModalitiesInStudy`` (or ``Modality``) takes a list (``CT,MR`` or ``CT\\MR``): a study matches
    with any of them; ``StudyDate`` a DICOM range (``20240101-20240131``, open-ended allowed);
    ``BodyPartExamined`` and ``PatientID`` one value (``*`` is universal matching, other wildcards
    are refused); ``DRHExcludeReferencePatient`` YES or NO.
    """
    raw_modalities = params.get("ModalitiesInStudy") or params.get("Modality") or ""
    modalities = [m.strip().upper() for m in re.split(r"[,\\]", raw_modalities) if m.strip() not in {"", "*"}]
    if any("*" in m or "?" in m for m in modalities):
        raise QueryError("malformed", "wildcards in ModalitiesInStudy are not supported here")
    date_from, date_to = parse_date_range(params.get("StudyDate", ""))
    exclude = (params.get(QIDO_EXCLUDE_KEY) or "").strip().upper()
    if exclude not in _YES | _NO:
        raise QueryError("malformed", f"{QIDO_EXCLUDE_KEY} is YES or NO")
    body_part = _single("BodyPartExamined", params.get("BodyPartExamined", ""))
    return Filters(
        modalities=tuple(modalities),
        date_from=date_from,
        date_to=date_to,
        body_part=body_part.upper() if body_part else None,
        patient_id=_single("PatientID", params.get("PatientID", "")),
        exclude_reference_patient=exclude in _YES,
    )
