"""DICOM pixels to the model's input: a 2-D float32 image in [0, 1] where higher is brighter.

The model only ever sees what a radiologist would see on a viewer's default display, so the chain is
the display chain of PS3.3 C.11 / PS3.4 N: stored values -> modality LUT or rescale (physical units
such as HU) -> VOI LUT or window (the vendor's chosen contrast) -> MONOCHROME1 / INVERSE presentation
inverted, so that bone is bright in every image whatever the modality wrote.

Decisions, so that workers and training agree:

- Window: the first VOI LUT of the VOI LUT Sequence when present (it is the vendor's tuned, often
  non-linear, display curve of CR/DX), else the first Window Center/Width pair with its VOI LUT
  Function, else a robust full-range fallback (0.5th to 99.5th percentile of the modality values).
  A window that saturates nearly the whole frame or squeezes it into a sliver of grey (a header that
  does not belong to these pixels) falls back the same way, except for projection radiographs
  whose window misses the pixels altogether: those are refused, since their polarity is in doubt.
  Enhanced multi-frame objects take rescale and window from the frame's functional groups.
- Colour (RGB, YBR_*, PALETTE COLOR) is converted to luminance (ITU-R BT.601 weights) rather than
  refused: ultrasound and secondary captures are part of a study, and DMIH pools over the study.
- Multi-frame: :func:`load_pixels` decodes only one frame (the middle one unless told), which is
  representative of a cine loop or volume and keeps memory flat; :func:`load_frames` gives them all.
- Refusals carry a short machine-friendly ``code`` and a human ``reason`` that never includes patient
  data (only header facts such as transfer syntax, photometric interpretation, sizes, windows).

:class:`NotAnImage` (valid DICOM, not to be indexed; the worker records it as ignored):
``no_pixel_data``, ``structured_report``, ``key_object_selection``, ``presentation_state``,
``segmentation``, ``non_image_object`` (raw data, registration), ``rt_dose``, ``rt_object``,
``parametric_map``, ``encapsulated_document``, ``waveform``, ``float_pixel_data``, ``too_small``,
``for_processing`` (raw DX/MG/IO detector data: the FOR PRESENTATION copy is the one indexed),
``whole_slide_microscopy``.

:class:`DecodeError` (should be an image, is not; the worker records a failure, retried only when
``transient``): transient ``file_not_found``, ``io_error``, ``out_of_memory``; permanent
``not_dicom``, ``truncated_file``, ``malformed_dataset``, ``missing_pixel_data`` (an image SOP
class without pixels: a cut or stripped file), ``bad_pixel_module``,
``unsupported_photometric``, ``missing_transfer_syntax``, ``unsupported_transfer_syntax``,
``decoder_unavailable``, ``truncated_pixel_data``, ``corrupt_pixel_data``, ``bad_palette``,
``bad_modality_lut``, ``window_outside_data`` (a radiograph whose window misses its pixels),
``bad_shape``, ``non_finite``, ``blank_image``.

The steps live in their own modules: :mod:`hashing.reading` (file to dataset),
:mod:`hashing.sopclass` (what kind of object), :mod:`hashing.decode` (stored values, per transfer
syntax), :mod:`hashing.display` (the display chain to [0, 1]) and :mod:`hashing.resize` (the model's
square input). ``drh-pacs decode-check DIR`` (:mod:`hashing.decode_check`) runs the same code on a
folder and says, per file, what came out.
"""

from __future__ import annotations

import os

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from hashing.display import check_sane, frame_to_image
from hashing.errors import DecodeError, NotAnImage, PreprocessError
from hashing.pictures import is_picture, picture_pixels, read_picture
from hashing.reading import ensure_transfer_syntax, read_dataset
from hashing.resize import fit_to_square, model_input
from hashing.sopclass import check_is_image, number_of_frames

__all__ = [
    "DecodeError",
    "NotAnImage",
    "PreprocessError",
    "check_sane",
    "fit_to_square",
    "load_file",
    "evenly_spaced",
    "load_frames",
    "load_image",
    "load_pixels",
    "model_input",
    "read_dataset",
]


def _prepare(ds: Dataset) -> int:
    check_is_image(ds)
    ensure_transfer_syntax(ds)
    return number_of_frames(ds)


def load_pixels(ds: pydicom.Dataset, frame: int | None = None) -> np.ndarray:
    """One frame as float32 2-D in [0, 1], higher is brighter; the middle frame unless ``frame`` is given.

    Raises :class:`NotAnImage` or :class:`DecodeError` (never a bare pydicom or codec exception).
    """
    nframes = _prepare(ds)
    index = nframes // 2 if frame is None else frame
    if not 0 <= index < nframes:
        raise ValueError(f"frame {index} out of range: the object has {nframes} frame(s)")
    return frame_to_image(ds, index)


def load_frames(ds: pydicom.Dataset, limit: int | None = None) -> list[np.ndarray]:
    """Every frame, or at most ``limit`` evenly spaced ones (:func:`evenly_spaced`), each as
    :func:`load_pixels` would give it: a 2,000-frame cine loop costs ``limit`` decodes."""
    nframes = _prepare(ds)
    indices = range(nframes) if limit is None else evenly_spaced(nframes, limit)
    return [frame_to_image(ds, i) for i in indices]


def evenly_spaced(total: int, limit: int) -> list[int]:
    """At most ``limit`` indices of ``range(total)``, evenly spaced and centred (the middle one for
    ``limit`` 1), so that a volume or a loop is sampled from end to end whatever its length."""
    if total <= 0 or limit <= 0:
        return []
    if total <= limit:
        return list(range(total))
    step = total / limit
    return sorted({min(total - 1, int(step * (i + 0.5))) for i in range(limit)})


def load_file(path: str | os.PathLike[str] | bytes, frame: int | None = None) -> np.ndarray:
    """:func:`read_dataset` then :func:`load_pixels`: the worker's one call."""
    return load_pixels(read_dataset(path), frame)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Any image file, DICOM or picture (PNG, JPEG...), as the 2-D [0, 1] image the model input is made
    from: what ``train`` and ``evaluate`` read, through the same steps as the workers."""
    if is_picture(path):
        return read_picture(path)
    return load_file(path)


# Magic numbers of the picture formats an upload may be in (a dropped PNG or JPEG export).
_PICTURE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF8", b"BM")


def load_bytes(data: bytes) -> tuple[Dataset | None, np.ndarray]:
    """An uploaded file, DICOM or picture, as (its dataset or None, the 2-D [0, 1] image): the HTTP
    upload's path, the same steps as a worker's and a training's."""
    if data[:4].startswith(_PICTURE_MAGIC) or data[:3] == b"\xff\xd8\xff":
        import io

        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return None, picture_pixels(im)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DecodeError(f"not a readable picture ({type(exc).__name__})", code="not_a_picture") from exc
    ds = read_dataset(data)
    return ds, load_pixels(ds)
