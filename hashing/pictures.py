"""Pictures that are not DICOM (PNG, JPEG, TIFF...): exported images in training sets and uploads.

They enter the same pixel path as DICOM at the same point: a 2-D float32 image in [0, 1] where higher
is brighter, grey levels as stored (value / 255 for 8 bits, / 65535 for 16), colour reduced to
luminance with the BT.601 weights the DICOM colour path uses (:data:`hashing.display.LUMA`). A DICOM
image of at most 8 bits without a window and its exported PNG therefore give the same model input.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hashing.display import LUMA, check_sane
from hashing.errors import DecodeError

SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"})


def is_picture(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def read_picture(path: str | os.PathLike[str]) -> np.ndarray:
    """A picture file as a 2-D float32 image in [0, 1]; :class:`DecodeError` when it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return picture_pixels(im)
    except FileNotFoundError as exc:
        raise DecodeError(f"file not found ({exc.strerror})", transient=True, code="file_not_found") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DecodeError(f"not a readable picture ({type(exc).__name__})", code="not_a_picture") from exc


def picture_pixels(im: Image.Image) -> np.ndarray:
    """A PIL image's pixels, grey levels as stored, colour as BT.601 luminance."""
    if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    arr = np.asarray(im)
    if im.mode in ("RGB", "RGBA"):
        img = (arr[..., :3].astype(np.float64) @ LUMA.astype(np.float64)) / 255.0
    elif im.mode in ("L", "LA"):
        img = (arr[..., 0] if arr.ndim == 3 else arr).astype(np.float64) / 255.0
    elif im.mode == "1":
        img = arr.astype(np.float64)
    elif im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) <= 65535 and arr.min(initial=0) >= 0):
        img = arr.astype(np.float64) / 65535.0
    elif im.mode in ("I", "F"):
        lo, hi = float(arr.min()), float(arr.max())
        img = (arr.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(arr.shape)
    else:
        raise DecodeError(f"picture mode {im.mode} not supported", code="unsupported_photometric")
    out = np.ascontiguousarray(np.clip(img, 0.0, 1.0), dtype=np.float32)
    check_sane(out)
    return out
