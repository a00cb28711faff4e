"""Decoding the stored values of one frame, whatever the transfer syntax.

pydicom's pixel decoders with the pylibjpeg plugins (JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE) and our own
inflater for Deflated Image Frame Compression. A new transfer syntax is either a pydicom decoder
plugin (nothing to change here) or a branch in :func:`decode_frame`; the SCP accepts only what this
module decodes (:data:`plugin.dicom.scp.STORAGE_TRANSFER_SYNTAXES`).

GDCM as a second opinion: libjpeg (pylibjpeg) refuses some valid streams that DCMTK and GDCM read,
notably 12-bit JPEG Extended with a marker segment where it does not expect one ("misplaced marker
segment", found in real NM and CR archives). A greyscale frame of a JPEG-family syntax that the
plugins fail on is decoded again by GDCM's own reader (pydicom's gdcm plugin refuses 12-bit JPEG
Extended), **in a child process** (:func:`_gdcm_in_child`): GDCM aborts the whole process on some
corrupt streams, which must cost a child, not a worker. Refusing these syntaxes at negotiation
instead would turn away every image of a PACS that cannot transcode them, including the majority
that pylibjpeg reads.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from hashing.errors import DecodeError, short
from hashing.sopclass import UID_RE, number_of_frames

# Decoder plugin tried first when several can handle a transfer syntax.
PREFERRED_PLUGIN = "pylibjpeg"
# Plugins never used: python-gdcm aborts the whole process (an uncaught C++ gdcm::Exception ->
# std::terminate) on some corrupt JPEG streams, which would kill a worker on one bad file.
# Every sample in the project's test corpus decodes without it (pylibjpeg, pillow, pydicom).
UNSAFE_PLUGINS = ("gdcm",)
# Syntaxes whose failures GDCM gets a second try at (greyscale only: GDCM's colour output is not
# converted the way pydicom's is), and how long its child process may take.
GDCM_FALLBACK_SYNTAXES = {
    pydicom.uid.JPEGBaseline8Bit,
    pydicom.uid.JPEGExtended12Bit,
    pydicom.uid.JPEGLossless,
    pydicom.uid.JPEGLosslessSV1,
    pydicom.uid.JPEGLSLossless,
    pydicom.uid.JPEGLSNearLossless,
}
GDCM_TIMEOUT_SECONDS = 120.0
# Deflated Image Frame Compression (PS3.5 A.4.11, 2023): each frame is raw-deflated native pixels.
# pydicom 3.0 has no decoder for it, so we inflate the frames ourselves.
DEFLATED_IMAGE_FRAME = UID("1.2.840.10008.1.2.8.1")


class _PluginFailuresAreReportedOnce(logging.Filter):
    """Drops pydicom's ERROR (with its traceback) for each decoding plugin that fails.

    :func:`_run_decoder` tries the plugins itself and a frame no decoder reads fails once, as a
    :class:`DecodeError` naming every plugin's reason. A plugin that fails before another decoder
    succeeds is no error: a 12-bit JPEG Extended image that libjpeg and Pillow refuse and GDCM reads
    was indexed, and the service log showed two ERROR lines for it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and record.exc_info)


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_PluginFailuresAreReportedOnce())


def decode_frame(ds: Dataset, frame: int) -> tuple[np.ndarray, str]:
    """Stored values of one frame (rows, cols) or (rows, cols, 3), and the photometric it is in."""
    text = str(getattr(ds.file_meta, "TransferSyntaxUID", "") or "")
    if not text:
        raise DecodeError("compressed pixel data but no transfer syntax", code="missing_transfer_syntax")
    if not UID_RE.match(text):
        raise DecodeError("transfer syntax UID is malformed", code="malformed_dataset")
    ts = UID(text)
    if ts == DEFLATED_IMAGE_FRAME:
        return _inflate_frame(ds, frame), str(ds.PhotometricInterpretation).strip().upper()
    try:
        decoder = pydicom.pixels.get_decoder(ts)
    except NotImplementedError as exc:
        name = ts.name if ts.is_transfer_syntax else ts
        raise DecodeError(f"transfer syntax {name} not supported", code="unsupported_transfer_syntax") from exc
    usable = [name for name in decoder.available_plugins if name not in UNSAFE_PLUGINS]
    if not decoder.is_available or (decoder.available_plugins and not usable):
        raise DecodeError(
            f"no usable decoder installed for {ts.name} (install the pylibjpeg plugins)",
            code="decoder_unavailable",
        )
    try:
        arr, meta = _run_decoder(decoder, ds, frame)
    except MemoryError as exc:
        raise DecodeError("out of memory while decoding", transient=True, code="out_of_memory") from exc
    except _DecodeFailed as exc:
        low = exc.summary.lower()
        if any(hint in low for hint in ("less than expected", "too short", "insufficient", "truncat")):
            reason = f"pixel data shorter than the header says ({exc.summary})"
            raise DecodeError(reason, code="truncated_pixel_data") from exc
        if ts in GDCM_FALLBACK_SYNTAXES and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and gdcm_available():
            return _gdcm_in_child(ds, frame, first_failure=f"{ts.name}: {exc.summary}")
        raise DecodeError(f"{ts.name}: {exc.summary}", code="corrupt_pixel_data") from exc
    phot = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation)).strip().upper()
    return arr, phot


def gdcm_available() -> bool:
    """Whether python-gdcm is installed (it is not imported here: only the child process loads it)."""
    import importlib.util

    return importlib.util.find_spec("gdcm") is not None


def _gdcm_in_child(ds: Dataset, frame: int, first_failure: str) -> tuple[np.ndarray, str]:
    """One frame decoded by GDCM in a child process (see the module docstring); its crash or
    refusal is a :class:`DecodeError` that names both decoders' reasons."""
    path = getattr(ds, "filename", None)
    temporary = None
    if not (isinstance(path, str) and os.path.exists(path)):
        fd, temporary = tempfile.mkstemp(suffix=".dcm", prefix="drh-gdcm-")
        os.close(fd)
        ds.save_as(temporary, enforce_file_format=False)
        path = temporary
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hashing.decode", path, str(frame)],
            capture_output=True,
            timeout=GDCM_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        reason = f"{first_failure}; GDCM took over {GDCM_TIMEOUT_SECONDS:.0f} s"
        raise DecodeError(reason, code="corrupt_pixel_data") from exc
    finally:
        if temporary:
            os.unlink(temporary)
    if proc.returncode != 0:
        why = "crashed" if proc.returncode < 0 else "refused it"
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = short(lines[-1] if lines else f"exit status {proc.returncode}", 120)
        raise DecodeError(f"{first_failure}; GDCM {why} ({detail})", code="corrupt_pixel_data")
    header, _, data = proc.stdout.partition(b"\n")
    info = json.loads(header)
    arr = np.frombuffer(data, dtype=np.dtype(info["dtype"])).reshape(info["shape"])
    return arr, str(info["photometric"]).strip().upper()


_GDCM_DTYPES = {"UINT8": "u1", "INT8": "i1", "UINT12": "<u2", "INT12": "<i2", "UINT16": "<u2", "INT16": "<i2",
                "UINT32": "<u4", "INT32": "<i4", "FLOAT32": "<f4", "FLOAT64": "<f8"}  # fmt: skip


def _gdcm_child(path: str, frame: int) -> int:
    """The child's side: decode with GDCM's ImageReader, write a JSON header line and the frame's
    raw values to stdout."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        print("GDCM cannot read the file", file=sys.stderr)
        return 2
    image = reader.GetImage()
    fmt = image.GetPixelFormat()
    dtype = _GDCM_DTYPES.get(fmt.GetScalarTypeAsString())
    if dtype is None or fmt.GetSamplesPerPixel() != 1:
        print(f"GDCM pixel format {fmt.GetScalarTypeAsString()} not supported here", file=sys.stderr)
        return 2
    dims = list(image.GetDimensions())
    cols, rows = int(dims[0]), int(dims[1])
    frames = int(dims[2]) if len(dims) > 2 else 1
    raw = image.GetBuffer()
    if not raw:
        print("GDCM cannot decode the pixel data either", file=sys.stderr)
        return 2
    buffer = raw.encode("utf-8", "surrogateescape")  # SWIG hands the bytes over as str
    values = np.frombuffer(buffer, dtype=np.dtype(dtype))
    if values.size != frames * rows * cols or not 0 <= frame < frames:
        print(f"GDCM gave {values.size} values for {frames} frame(s) of {rows}x{cols}", file=sys.stderr)
        return 2
    chosen = values.reshape(frames, rows, cols)[frame]
    header = {
        "dtype": chosen.dtype.str,
        "shape": [rows, cols],
        "photometric": image.GetPhotometricInterpretation().GetString(),
    }
    sys.stdout.buffer.write(json.dumps(header).encode() + b"\n" + chosen.tobytes())
    return 0


class _DecodeFailed(Exception):
    """Every decoder plugin failed; ``summary`` is the most specific of their messages."""

    def __init__(self, messages: list[str]) -> None:
        specific = [m for m in messages if "does not support" not in m and "NoneType" not in m]
        self.summary = short((specific or messages or ["unknown decoder failure"])[0], 240)
        super().__init__(self.summary)


def _run_decoder(decoder: Any, ds: Dataset, frame: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Try each plugin in turn, our preferred one (pylibjpeg, a declared dependency) first.

    We loop ourselves rather than let pydicom do it because (1) pydicom logs an ERROR for every
    plugin that cannot handle a stream even when the next one succeeds, which IT staff would read
    as failures, and (2) the Rust plugins (pylibjpeg-rle) *panic* on some corrupt streams, raising
    a BaseException that pydicom does not catch and that would take the worker task down.
    """
    available = [name for name in decoder.available_plugins if name not in UNSAFE_PLUGINS]
    plugins = sorted(available, key=lambda name: name != PREFERRED_PLUGIN)
    messages: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in plugins or [""]:  # native transfer syntaxes have no plugins
            try:
                return decoder.as_array(ds, index=frame, raw=False, decoding_plugin=name)
            except (MemoryError, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # noqa: B036 - a Rust panic is a BaseException
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
                if lines[0].startswith("Unable to decode") and len(lines) > 1:
                    first = lines[1]  # pydicom's wrapper; the next line is "<plugin>: <the reason>"
                else:
                    first = f"{name}: {lines[0]}" if name else lines[0]
                messages.append(first)
                if not name or "less than expected" in first:
                    break  # the same check runs before any plugin: no point trying the others
    raise _DecodeFailed(messages)


def _inflate_frame(ds: Dataset, frame: int) -> np.ndarray:
    from pydicom.encaps import generate_frames

    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel)
    bits = int(ds.BitsAllocated)
    nframes = number_of_frames(ds)
    try:
        data = next(iter(_nth(generate_frames(ds.PixelData, number_of_frames=nframes), frame)))
        raw = zlib.decompress(data, -15)
    except (zlib.error, StopIteration, ValueError) as exc:
        raise DecodeError(f"deflated frame {frame} unreadable ({short(exc)})", code="corrupt_pixel_data") from exc
    if bits == 1:
        flat = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[: rows * cols * spp]
    else:
        dtype = {8: "u1", 16: "u2", 32: "u4"}.get(bits)
        if dtype is None:
            raise DecodeError(f"BitsAllocated {bits} not supported", code="bad_pixel_module")
        if int(ds.get("PixelRepresentation", 0) or 0) == 1:
            dtype = dtype.replace("u", "i")
        flat = np.frombuffer(raw, np.dtype("<" + dtype))[: rows * cols * spp]
    if flat.size < rows * cols * spp:
        raise DecodeError("deflated frame shorter than Rows x Columns", code="truncated_pixel_data")
    shape = (rows, cols, spp) if spp > 1 else (rows, cols)
    return flat.reshape(shape)


def _nth(it: Iterator[bytes], n: int) -> Iterator[bytes]:
    for i, item in enumerate(it):
        if i == n:
            yield item
            return


if __name__ == "__main__":  # the GDCM child process of _gdcm_in_child
    sys.exit(_gdcm_child(sys.argv[1], int(sys.argv[2])))
