"""Checks a received dataset must pass before the C-STORE handler answers success.

pydicom accepts a value shorter than the image it describes (a truncated transfer), so the handler
checks the pixel data's length here: the sender is told at once, instead of a worker failing later on
a file the PACS believes delivered.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID


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


def is_image_sop_class(uid: str) -> bool:
    """Image storage classes are indexed; SR, PR, KO, waveforms, RT objects... are not images."""
    return "Image" in UID(uid).name
