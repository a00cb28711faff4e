"""The fixed-width record of the study attributes that filters need, and how values map into it.

Why a compact record: a replica of a million studies must load, and filter, without reading a
million hashes. Each study number has a 24-byte record in ``ns:sattr`` (:data:`ATTR_DTYPE`): StudyDate
as an integer, the modalities as a bitmask over a small vocabulary, the body part as an id and the
PatientID as a 64-bit BLAKE2b hash, so no readable ID sits in a replica's memory or a core dump (a
pseudonym, not anonymisation: an ID space can be searched). Two patients collide with probability
about 2**-64 per pair.

A new filter on a study attribute is a field here, its value in :meth:`plugin.store.records.Records`'s
record builder, its test in :mod:`plugin.search.eligible`, and its parsers (:class:`plugin.search.filters.Filters`).
"""

from __future__ import annotations

import hashlib

import numpy as np

# The per-study record of filter attributes, little-endian, 24 bytes.
ATTR_DTYPE = np.dtype(
    [
        ("date", "<i4"),  # StudyDate as YYYYMMDD, 0 unknown
        ("body", "<u2"),  # body part id from ns:vocab:body_part, 0 unknown
        ("flags", "<u2"),  # bit 0: the study has metadata
        ("modmask", "<u8"),  # bit i: the modality with vocabulary number i is in the study
        ("patient", "<u8"),  # patient_key(PatientID), 0 when there is none
    ]
)
ATTR_SIZE = ATTR_DTYPE.itemsize
FLAG_KNOWN = 1
# Modalities past the 63rd distinct one share the last bit (a filter on them may over-include).
MODALITY_BITS = 64


def patient_key(patient_id: str | None) -> int:
    """The 64-bit key under which a PatientID is filtered (0 for none): BLAKE2b, not the ID itself."""
    pid = (patient_id or "").strip()
    if not pid:
        return 0
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little") or 1


def parse_date(value: str | None) -> int:
    """DICOM DA ``YYYYMMDD`` to an int, 0 when absent or malformed."""
    text = (value or "").strip().replace("-", "").replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return 0
    return int(text)


def split_modalities(value: str | None) -> list[str]:
    """``"CR,DX"`` or ``"CR\\\\DX"`` to ``["CR", "DX"]`` (upper case, no blanks, no duplicates)."""
    out: list[str] = []
    for part in (value or "").replace("\\", ",").split(","):
        term = part.strip().upper()
        if term and term not in out:
            out.append(term)
    return out


def modality_mask(numbers: list[int | None]) -> int:
    """The ``modmask`` bits of modality vocabulary numbers (None: a term never seen, no bit)."""
    mask = 0
    for number in numbers:
        if number is not None:
            mask |= 1 << min(int(number) - 1, MODALITY_BITS - 1)
    return mask
