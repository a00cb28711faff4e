"""Checks a received dataset must pass before the C-STORE handler answers success.

pydicom accepts a value shorter than the image it describes (a truncated transfer), so the handler
checks the pixel data's length here: the sender is told at once, instead of a worker failing later on
a file the PACS believes delivered.

Received datasets arrive as files (pynetdicom writes them to disk as the fragments come,
``STORE_RECV_CHUNKED_DATASET``), and :func:`read_received` checks them there: every element before
the pixel data is decoded, the pixel data is only measured (its fragments walked by their item
headers), so a 2 GB object costs a few kilobytes of memory, not 2 GB.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

# Explicit VR elements whose length field is 4 bytes (after 2 reserved ones), per PS3.5 7.1.2.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_PIXEL_DATA_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_UNDEFINED = 0xFFFFFFFF


class ReceivedFile:
    """A received C-STORE file: its dataset (pixel data not loaded), where the dataset starts in the
    file, and why its pixel data cannot be complete (or None)."""

    def __init__(self, path: Path, dataset: Dataset, dataset_offset: int, pixel_problem: str | None) -> None:
        self.path = path
        self.dataset = dataset
        self.dataset_offset = dataset_offset
        self.pixel_problem = pixel_problem

    def dataset_bytes(self, chunk: int = 1 << 20) -> Iterator[bytes]:
        """The dataset exactly as received (no file meta), in chunks: spooled without re-encoding."""
        with open(self.path, "rb") as fh:
            fh.seek(self.dataset_offset)
            while data := fh.read(chunk):
                yield data


def read_received(path: Path) -> ReceivedFile:
    """Read a received file (preamble, meta, dataset) without loading its pixel data's value.

    Every element before the pixel data is converted now, so a damaged header fails here (any
    exception is the sender's malformed dataset).
    """
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # recorded, never printed: pydicom's warnings quote values
        fp.seek(128 + 4)
        group = fp.read(12)
        if len(group) < 12 or group[:4] != b"\x02\x00\x00\x00":
            raise ValueError("received file without a file meta group length")
        dataset_offset = 132 + 12 + int.from_bytes(group[8:12], "little")
        fp.seek(0)
        ds = dcmread(fp, stop_before_pixels=True, force=True)
        for _ in ds.iterall():  # convert every element now: a truncated value fails here, not in a worker
            pass
        syntax = ds.file_meta.TransferSyntaxUID
        if any("end of file" in str(w.message).lower() for w in caught):
            return ReceivedFile(path, ds, dataset_offset, "dataset truncated before its pixel data")
        if syntax.is_deflated:
            # Deflated datasets cannot be walked on disk; they are small (not used for images in practice).
            fp.seek(0)
            full = dcmread(fp, force=True)
            problem = pixel_data_problem(full) if "PixelData" in full else _no_pixels(ds)
        else:
            problem = _pixel_problem_in_file(fp, ds, size, syntax)
    return ReceivedFile(path, ds, dataset_offset, problem)


def _no_pixels(ds: Dataset) -> str | None:
    return None if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "image object without pixel data"


def _pixel_problem_in_file(fp: BinaryIO, ds: Dataset, size: int, syntax: UID) -> str | None:
    """:func:`pixel_data_problem` on the file, from the pixel data element's header on."""
    little = syntax.is_little_endian
    order = "little" if little else "big"
    head = fp.read(8)
    if len(head) < 8:
        return _no_pixels(ds)
    group, element = int.from_bytes(head[0:2], order), int.from_bytes(head[2:4], order)
    if (group, element) not in _PIXEL_DATA_TAGS:
        return _no_pixels(ds)
    if (group, element) != (0x7FE0, 0x0010):
        return None  # float pixel data: not decoded by us, the worker records it as not an image
    if syntax.is_implicit_VR:
        length = int.from_bytes(head[4:8], order)
    elif head[4:6] in _LONG_VRS:
        extra = fp.read(4)
        if len(extra) < 4:
            return "pixel data truncated (0 bytes)"
        length = int.from_bytes(extra, order)
    else:
        length = int.from_bytes(head[6:8], order)
    start = fp.tell()
    if length == 0:
        return "empty pixel data"
    if not syntax.is_encapsulated:
        if length == _UNDEFINED:
            return "native pixel data of undefined length"
        available = min(length, size - start)
        return _native_problem(ds, available)
    end = size if length == _UNDEFINED else min(size, start + length)
    items = 0
    pos = start
    while True:
        if pos + 8 > end:
            if length == _UNDEFINED or pos != end:
                return "compressed pixel data truncated or malformed"
            break
        fp.seek(pos)
        item = fp.read(8)
        tag = (int.from_bytes(item[0:2], "little"), int.from_bytes(item[2:4], "little"))
        item_length = int.from_bytes(item[4:8], "little")
        if tag == (0xFFFE, 0xE0DD):
            break
        if tag != (0xFFFE, 0xE000) or pos + 8 + item_length > end:
            return "compressed pixel data truncated or malformed"
        pos += 8 + item_length
        items += 1
    if items < 2:  # the basic offset table, then at least one fragment
        return "compressed pixel data has no fragment"
    return None


_BAD_GEOMETRY = "missing or invalid Rows/Columns/BitsAllocated"


def _native_bytes(ds: Dataset) -> int | None:
    """Bytes of native pixel data the header describes (None: its geometry is missing or invalid)."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    pixels = rows * cols * samples * frames
    return (pixels + 7) // 8 if bits == 1 else pixels * (bits // 8)


def _native_problem(ds: Dataset, available: int) -> str | None:
    expected = _native_bytes(ds)
    if expected is None:
        return _BAD_GEOMETRY
    if available < expected:
        return f"pixel data truncated ({available} of {expected} bytes)"
    return None


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
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if transfer_syntax is None or not transfer_syntax.is_encapsulated:
        return _native_problem(ds, len(data))
    if _native_bytes(ds) is None:
        return _BAD_GEOMETRY
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
