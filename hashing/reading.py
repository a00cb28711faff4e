"""Reading a DICOM object: from a path, bytes or a file, with or without preamble and meta header.

Everything pydicom can raise on a damaged or foreign file becomes a :class:`~hashing.errors.DecodeError`
with a code (``not_dicom``, ``truncated_file``, ``malformed_dataset``, ``io_error``...), and every
element is converted while reading, so a garbled header fails here and not deep inside a decoder.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from hashing.errors import DecodeError, short


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
            raise DecodeError(f"file ends or breaks inside the dataset ({short(exc)})", code="truncated_file") from exc
        why = exc.strerror or type(exc).__name__
        raise DecodeError(f"read failed ({why})", transient=True, code="io_error") from exc
    except MemoryError as exc:
        raise DecodeError("out of memory while reading", transient=True, code="out_of_memory") from exc
    except EOFError as exc:
        raise DecodeError("file ends inside the dataset", code="truncated_file") from exc
    except InvalidDicomError as exc:
        raise DecodeError(f"not a DICOM file ({short(exc)})", code="not_dicom") from exc
    except Exception as exc:  # pydicom raises many types on garbage; all mean the same thing here
        # Parser messages can quote element values (a name, an ID): drop every quoted part.
        text = re.sub(r"(['\"]).*?\1", "'...'", short(exc, 400))
        reason = f"malformed dataset ({type(exc).__name__}: {short(text)})"
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
    ensure_transfer_syntax(ds)
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


def ensure_transfer_syntax(ds: Dataset) -> None:
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
