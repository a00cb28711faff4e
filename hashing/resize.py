"""Fitting an image into the model's square input: the one resize that training and serving share."""

from __future__ import annotations

import numpy as np
from PIL import Image


def fit_to_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side is ``size`` (aspect kept, antialiased) and pad to ``size x size`` with 0.

    Squashing a 2:1 image into a square would change the anatomy the model sees, so we pad instead;
    0 is the black of a radiograph's collimated border. The image is centred.
    """
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    src = np.ascontiguousarray(img, dtype=np.float32)
    if (nh, nw) != (h, w):
        resized = Image.fromarray(src).resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
        src = np.asarray(resized, dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = np.clip(src, 0.0, 1.0)
    return out


def model_input(img: np.ndarray, size: int) -> np.ndarray:
    """The one function that turns a decoded image (2-D, [0, 1], higher is brighter) into model input.

    Fitted into the ``size`` square (aspect kept, zero padded) and quantised to the 256 grey levels a
    display shows: workers, the HTTP upload, ``train`` and ``evaluate`` all call it, so the network
    is served exactly the pixels it was trained on. Returns ``uint8 (size, size)``; the network's
    normalisation ((x / 255 - mean) / std, stored in the checkpoint) follows.
    """
    return np.round(fit_to_square(img, size) * 255.0).astype(np.uint8)
