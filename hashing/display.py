"""The display chain: stored values of a frame to a 2-D float32 image in [0, 1] where higher is brighter.

The model only ever sees what a radiologist would see on a viewer's default display, so the chain is
the display chain of PS3.3 C.11 / PS3.4 N: stored values -> modality LUT or rescale (physical units
such as HU) -> VOI LUT or window (the vendor's chosen contrast) -> MONOCHROME1 / INVERSE presentation
inverted, so that bone is bright in every image whatever the modality wrote.

- Window: the first VOI LUT of the VOI LUT Sequence when present (the vendor's tuned, often
  non-linear, display curve of CR/DX), else the first Window Center/Width pair with its VOI LUT
  Function; without either, an image of at most 8 stored bits (and no rescale) is shown as stored
  (value / 255, as on an 8-bit display and in an exported PNG or JPEG), and deeper images get a
  robust full-range fallback (0.5th to 99.5th percentile of the modality values).
  A window that saturates nearly the whole frame or squeezes it into a sliver of grey (a header that
  does not belong to these pixels) falls back the same way, except for projection radiographs
  whose window misses the pixels altogether: those are refused, since their polarity is in doubt.
  Enhanced multi-frame objects take rescale and window from the frame's functional groups.
- Colour (RGB, YBR_*, PALETTE COLOR) is converted to luminance (ITU-R BT.601 weights) rather than
  refused: ultrasound and secondary captures are part of a study, and DMIH pools over the study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from hashing.decode import decode_frame
from hashing.errors import DecodeError, NotAnImage, short
from hashing.sopclass import MONO

# Smallest side (pixels) of an image worth indexing; below it the model sees only interpolation.
MIN_SIDE = 16
# A frame whose values span less than this (on the [0, 1] scale) is blank.
MIN_RANGE = 1.0 / 1024
# A window that puts more than this fraction of pixels at one extreme is inconsistent with the data.
MAX_SATURATED = 0.98
# A window must spread the bulk of the data (see FALLBACK_PERCENTILES) over at least this much of
# [0, 1]; less means the header's window does not belong to these pixels (a copied or fake header).
MIN_WINDOW_SPAN = 0.1
# Robust full-range fallback when there is no usable window: these percentiles map to 0 and 1.
FALLBACK_PERCENTILES = (0.5, 99.5)
# Projection radiography: a window that misses the pixels altogether is refused, not guessed around.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RG", "RF", "XA", "PX", "IO"})
# ITU-R BT.601 luma weights (what DICOM's YBR_FULL uses).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# -- per-frame display parameters ------------------------------------------------------------------


@dataclass
class _Display:
    """Everything between stored values and the displayed grey level, for one frame."""

    slope: float = 1.0
    intercept: float = 0.0
    modality_lut: Dataset | None = None  # a ModalityLUTSequence item
    voi_lut: Dataset | None = None  # a VOILUTSequence item
    center: float | None = None
    width: float | None = None
    function: str = "LINEAR"
    invert: bool = False


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        if not value:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _display_params(ds: Dataset, frame: int) -> _Display:
    p = _Display()
    # Enhanced multi-frame: the frame's own functional group, then the shared one, then top level.
    sources: list[Dataset] = []
    for seq_kw, idx in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(seq_kw)
        if seq is not None and len(seq) > idx:
            sources.append(seq[idx])
    sources.append(ds)

    def find(seq_keyword: str | None, keyword: str) -> Any:
        for src in sources:
            holder = src
            if seq_keyword and src is not ds:
                inner = src.get(seq_keyword)
                if not inner:
                    continue
                holder = inner[0]
            elif seq_keyword and src is ds:
                holder = ds
            value = holder.get(keyword)
            if value not in (None, ""):
                return value
        return None

    slope = _first(find("PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _first(find("PixelValueTransformationSequence", "RescaleIntercept"))
    if slope is not None and slope != 0:
        p.slope = slope
    if intercept is not None:
        p.intercept = intercept
    mlut = ds.get("ModalityLUTSequence")
    if mlut and slope is None and _lut_usable(mlut[0]):
        p.modality_lut = mlut[0]
    voi = find("FrameVOILUTSequence", "VOILUTSequence")
    if voi and _lut_usable(voi[0]):
        p.voi_lut = voi[0]
    p.center = _first(find("FrameVOILUTSequence", "WindowCenter"))
    width = _first(find("FrameVOILUTSequence", "WindowWidth"))
    p.width = width if width is not None and width >= 1 else None
    function = find("FrameVOILUTSequence", "VOILUTFunction")
    if function:
        p.function = str(function).strip().upper()
    phot = str(ds.PhotometricInterpretation).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    p.invert = phot == "MONOCHROME1" or (phot == "MONOCHROME2" and shape == "INVERSE")
    return p


# -- from stored values to [0, 1] --------------------------------------------------------------------


def _to_luminance(arr: np.ndarray, phot: str, ds: Dataset) -> np.ndarray:
    """Colour frame (already RGB, or palette indices) -> luminance in [0, 1]."""
    if phot == "PALETTE COLOR":
        try:
            rgb = pydicom.pixels.apply_color_lut(arr, ds)
        except Exception as exc:
            raise DecodeError(f"palette colour lookup failed ({short(exc)})", code="bad_palette") from exc
        try:
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except (AttributeError, IndexError, TypeError, ValueError):
            bits = 8 * rgb.dtype.itemsize
        if bits > 8 and float(rgb.max()) <= 255:
            bits = 8  # a known quirk: 16-bit descriptors over 8-bit palette entries
        return ((rgb.astype(np.float64) @ LUMA.astype(np.float64)) / float(2**bits - 1)).astype(np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DecodeError(f"{phot} frame has shape {arr.shape}, expected 3 samples", code="bad_pixel_module")
    if phot in ("YBR_FULL", "YBR_FULL_422"):
        # pydicom converts these to RGB while decoding; should one come through unconverted, do it here.
        # (YBR_ICT/YBR_RCT are undone by the JPEG 2000 codec itself.)
        arr = pydicom.pixels.convert_color_space(arr, "YBR_FULL", "RGB")
    bits = int(ds.get("BitsStored", ds.BitsAllocated) or ds.BitsAllocated)
    top = float(2**bits - 1)
    return (arr.astype(np.float64) @ LUMA.astype(np.float64) / top).astype(np.float32)


def _modality(arr: np.ndarray, p: _Display, ds: Dataset) -> np.ndarray:
    if p.modality_lut is not None:
        holder = Dataset()
        holder.ModalityLUTSequence = [p.modality_lut]
        holder.PixelRepresentation = ds.get("PixelRepresentation", 0)
        holder.BitsStored = ds.get("BitsStored", ds.BitsAllocated)
        try:
            return pydicom.pixels.apply_modality_lut(arr, holder).astype(np.float32)
        except Exception as exc:
            raise DecodeError(f"modality LUT unusable ({short(exc)})", code="bad_modality_lut") from exc
    out = arr.astype(np.float32)
    if p.slope != 1.0 or p.intercept != 0.0:
        out = (arr.astype(np.float64) * p.slope + p.intercept).astype(np.float32)
    return out


def _lut_usable(item: Dataset | None) -> bool:
    """Whether a Modality/VOI LUT item has a descriptor and data (empty items exist in the wild)."""
    if item is None:
        return False
    desc, data = item.get("LUTDescriptor"), item.get("LUTData")
    try:
        return desc is not None and len(desc) == 3 and data is not None and len(data) > 0
    except TypeError:
        return False


def _apply_voi_lut(values: np.ndarray, item: Dataset, ds: Dataset) -> np.ndarray | None:
    """The VOI LUT applied and normalised to [0, 1]; None when the LUT cannot be used."""
    holder = Dataset()
    holder.VOILUTSequence = [item]
    holder.PixelRepresentation = ds.get("PixelRepresentation", 0)
    holder.BitsStored = ds.get("BitsStored", ds.BitsAllocated)
    try:
        out = np.asarray(pydicom.pixels.processing.apply_voi(np.rint(values).astype(np.int64), holder), np.float64)
        data = item.LUTData
        table = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(data, np.float64)
    except Exception:
        return None
    # Normalise by the table's own output span, not its descriptor's bit depth: descriptors often
    # claim 16 bits for 12-bit tables, which would leave the image dark.
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        return None
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 window functions, giving [0, 1] instead of the display's bit range."""
    v = values.astype(np.float64)
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (v - center) / width))
    elif function == "LINEAR_EXACT":
        out = (v - center) / width + 0.5
    else:  # LINEAR, and anything unknown
        if width <= 1:
            out = (v >= center - 0.5).astype(np.float64)
        else:
            out = (v - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _stored_range(values: np.ndarray, p: _Display, ds: Dataset) -> np.ndarray | None:
    """An image of at most 8 stored bits with no window and no rescale, shown as stored (value / 255).

    That is what a viewer puts on an 8-bit display, and what an exported PNG or JPEG of it holds, so
    the same picture gives the same model input whichever way it arrives. None when it does not apply.
    """
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits > 8 or signed or p.modality_lut is not None or p.slope != 1.0 or p.intercept != 0.0:
        return None
    return np.clip(values / float(2**bits - 1), 0.0, 1.0).astype(np.float32)


def _full_range(values: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(values, FALLBACK_PERCENTILES)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _usable(img: np.ndarray | None) -> bool:
    """Whether a windowed frame shows the data: not blank, not all clipped, not squeezed into a sliver."""
    if img is None or not np.all(np.isfinite(img)):
        return False
    n = img.size
    if np.count_nonzero(img <= 0.0) / n >= MAX_SATURATED or np.count_nonzero(img >= 1.0) / n >= MAX_SATURATED:
        return False
    lo, hi = np.percentile(img, FALLBACK_PERCENTILES)
    return float(hi - lo) >= MIN_WINDOW_SPAN


def _refuse_disjoint_window(values: np.ndarray, p: _Display, ds: Dataset) -> None:
    """Refuse a radiograph whose window lies wholly outside its pixel values.

    Such a header contradicts its own pixels (seen in the wild: values offset by 32768 and
    inverted against the declared MONOCHROME2), so the polarity it declares cannot be trusted
    either; an inverted radiograph would be indexed as a different picture. Other modalities
    (CT, MR, US...) fall back to the full range: their polarity is not in doubt.
    """
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in PROJECTION_MODALITIES or p.center is None or p.width is None:
        return
    lo, hi = np.percentile(values, FALLBACK_PERCENTILES)
    w_lo, w_hi = p.center - p.width / 2, p.center + p.width / 2
    if w_hi < lo or w_lo > hi:
        raise DecodeError(
            f"{modality} window {p.center:g}/{p.width:g} lies outside the pixel values "
            f"({lo:g}..{hi:g}): header and pixels disagree, polarity unknown",
            code="window_outside_data",
        )


def _grey(arr: np.ndarray, p: _Display, ds: Dataset) -> np.ndarray:
    values = _modality(arr, p, ds)
    img: np.ndarray | None = None
    if p.voi_lut is not None:
        img = _apply_voi_lut(values, p.voi_lut, ds)
        if not _usable(img):
            img = None
    if img is None and p.center is not None and p.width is not None:
        img = _window(values, p.center, p.width, p.function)
        if not _usable(img):
            img = None
            _refuse_disjoint_window(values, p, ds)
    if img is None:
        img = _stored_range(values, p, ds)
    if img is None:
        img = _full_range(values)
    if p.invert:
        img = 1.0 - img
    return img


def frame_to_image(ds: Dataset, frame: int) -> np.ndarray:
    arr, phot = decode_frame(ds, frame)
    if phot in MONO:
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise DecodeError(f"{phot} frame has shape {arr.shape}", code="bad_pixel_module")
        img = _grey(arr, _display_params(ds, frame), ds)
    else:
        img = _to_luminance(arr, phot, ds)
    img = np.ascontiguousarray(np.clip(img, 0.0, 1.0), dtype=np.float32)
    check_sane(img)
    return img


def check_sane(img: np.ndarray) -> None:
    """Refuse what the model must not see: wrong shape, non-finite values, tiny or blank images."""
    if img.ndim != 2:
        raise DecodeError(f"decoded image has {img.ndim} dimensions, expected 2", code="bad_shape")
    if not np.all(np.isfinite(img)):
        raise DecodeError("decoded image has non-finite values", code="non_finite")
    if min(img.shape) < MIN_SIDE:
        raise NotAnImage(f"image of {img.shape[0]}x{img.shape[1]} pixels is too small to index", code="too_small")
    if float(img.max() - img.min()) < MIN_RANGE:
        raise DecodeError(f"decoded image is blank (constant {float(img.mean()):.3f})", code="blank_image")
