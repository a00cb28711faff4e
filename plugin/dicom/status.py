"""DICOM status codes and the private data elements of the similar-studies query.

Handlers name statuses through these constants, never as bare numbers, so that a reader can tell a
"refused: out of resources" from an "unable to process" without the standard open beside them.

The private block belongs to creator ``DRH-PACS 1`` in group ``PRIVATE_GROUP``. A viewer that cannot
call the ``SIMILAR`` AE title puts the reference UID (and optionally the number of results and a
maximum Hamming distance) there; every similar answer carries the rank, distance and score there.
The elements are registered in pydicom's private dictionary on import, so an identifier received in
Implicit VR Little Endian still decodes them with the right VR.
"""

from __future__ import annotations

from pydicom.datadict import add_private_dict_entries
from pydicom.dataset import Dataset

# -- statuses (PS3.4 C.4.1.1.4 / C.4.2.1.5 / B.2.3) -----------------------------------------------
SUCCESS = 0x0000
PENDING = 0xFF00
# Pending, but some optional keys were not supported: our private keys are answered, so unused.
PENDING_WARNING = 0xFF01
CANCEL = 0xFE00
# Query/Retrieve failures.
OUT_OF_RESOURCES = 0xA700
MOVE_OUT_OF_RESOURCES_MATCHES = 0xA701
MOVE_OUT_OF_RESOURCES_SUBOPS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000
MOVE_SUBOPS_WARNING = 0xB000
# Storage failures and warnings.
STORE_SOP_CLASS_NOT_SUPPORTED = 0x0122
STORE_OUT_OF_RESOURCES = 0xA700
STORE_DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STORE_CANNOT_UNDERSTAND = 0xC000
STORE_COERCION_OF_ELEMENTS = 0xB000
STORE_ELEMENTS_DISCARDED = 0xB006
# Processing failure (general, used for "refused" when nothing more specific applies).
PROCESSING_FAILURE = 0x0110

# -- private block ------------------------------------------------------------------------------
PRIVATE_CREATOR = "DRH-PACS 1"
PRIVATE_GROUP = 0x0099

# element offset in the block -> (VR, VM, description, keyword)
_ELEMENTS: dict[int, tuple[str, str, str, str]] = {
    0x01: ("UI", "1", "Similar Reference UID", "DRHReferenceUID"),
    0x02: ("IS", "1", "Similar Number Of Results", "DRHNumberOfResults"),
    0x03: ("IS", "1", "Similar Maximum Distance", "DRHMaximumDistance"),
    0x04: ("IS", "1", "Similar Rank", "DRHRank"),
    0x05: ("IS", "1", "Similar Hamming Distance", "DRHDistance"),
    0x06: ("DS", "1", "Similar Score", "DRHScore"),
    0x07: ("CS", "1", "Similar Exclude Reference Patient", "DRHExcludeReferencePatient"),
    0x08: ("LO", "1", "Similar Model Version", "DRHModelVersion"),
    0x09: ("LO", "1", "Similar Model Route", "DRHModelRoute"),
}

REFERENCE_UID = 0x01
NUMBER_OF_RESULTS = 0x02
MAX_DISTANCE = 0x03
RANK = 0x04
DISTANCE = 0x05
SCORE = 0x06
EXCLUDE_REFERENCE_PATIENT = 0x07
MODEL_VERSION = 0x08
MODEL_ROUTE = 0x09

add_private_dict_entries(
    PRIVATE_CREATOR,
    {
        (PRIVATE_GROUP << 16) | 0x1000 | offset: (vr, vm, name, "")
        for offset, (vr, vm, name, _keyword) in _ELEMENTS.items()
    },
)


def private_tag(offset: int, block: int = 0x10) -> int:
    """The full tag of element ``offset`` when the creator sits at ``(gggg,00bb)``."""
    return (PRIVATE_GROUP << 16) | (block << 8) | offset


def private_vr(offset: int) -> str:
    return _ELEMENTS[offset][0]


def find_private_block(ds: Dataset) -> int | None:
    """The block number (``0x10``-``0xFF``) our creator reserved in ``ds``, or None.

    A requester may put our creator in any free slot of the group, so it is looked up, not assumed.
    """
    for element in range(0x10, 0x100):
        tag = (PRIVATE_GROUP << 16) | element
        if tag in ds:
            value = ds[tag].value
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            if str(value or "").strip() == PRIVATE_CREATOR:
                return element
    return None


def private_text(ds: Dataset, offset: int) -> str | None:
    """The value of one of our private elements as stripped text; None when the element is absent.

    Values may arrive as UN (bytes) when the requester's dictionary did not know them.
    """
    block = find_private_block(ds)
    if block is None:
        return None
    tag = private_tag(offset, block)
    if tag not in ds:
        return None
    value = ds[tag].value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00")
    return str(value).strip()


def private_is_binary(ds: Dataset, offset: int) -> bool:
    """Whether one of our private elements arrived as bytes that are no text: DCMTK without our
    dictionary encodes ``-k (0099,1002)=500`` as a number (``00\\00``), which read as text is empty,
    and the query went on with the default instead of saying so."""
    block = find_private_block(ds)
    if block is None or private_tag(offset, block) not in ds:
        return False
    value = ds[private_tag(offset, block)].value
    if not isinstance(value, bytes):
        return False
    text = value[:-1] if value.endswith((b"\x00", b" ")) else value  # one byte of padding
    return bool(text) and not all(32 <= b < 127 for b in text)


def set_private(ds: Dataset, offset: int, value: object) -> None:
    """Write one of our private elements into an answer (creator in block 0x10)."""
    creator_tag = (PRIVATE_GROUP << 16) | 0x0010
    ds.add_new(creator_tag, "LO", PRIVATE_CREATOR)
    ds.add_new(private_tag(offset), private_vr(offset), value)


def dcmtk_dictionary() -> str:
    """Our private elements as a DCMTK data dictionary (``DCMDICTPATH``).

    Without it DCMTK tools encode unknown private tags as UN and read ``-k (0099,1001)=1.2.3`` as
    numbers, not text: a site that queries with ``findscu`` adds this file to its dictionary path.
    """
    lines = ["# drh-pacs private elements (creator DRH-PACS 1)"]
    for offset, (vr, vm, _name, keyword) in sorted(_ELEMENTS.items()):
        lines.append(f'({PRIVATE_GROUP:04x},"{PRIVATE_CREATOR}",{offset:02x})\t{vr}\t{keyword}\t{vm}\tPrivateTag')
    return "\n".join(lines) + "\n"
