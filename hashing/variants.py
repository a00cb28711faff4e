"""The query's variants: the re-ranking key of small shifts and zooms of the reference image.

A child's films from different visits differ in position and size: the child moved, and grew. The
whitened layout (:class:`hashing.resnet.LayoutPath`) compares two films area for area, so a film
shifted by a few pixels looks like another patient's. The tolerant re-ranking takes, for each
candidate of the Hamming shortlist, the best cosine between the candidate's stored key and the keys
of :data:`VARIANTS` of the *query* (the candidates' keys are stored once, unchanged). On validation
it found the patient's other film for 0.223 of queries against 0.152 for the plain layout, over the
whole database, and v6 as served 0.346 on the test split (hashing/weights/MODEL_CARD.md, "How the
tolerant re-ranking was found", "Evaluation").

Workers compute the variants' keys of every image they encode (each image may become a query) with
:func:`variant_keys`, the function ``evaluate`` and training's validation use.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# Shifts are fractions of the input's side (4 pixels of a 128-pixel input), so that a model trained at
# another input size transforms its images alike; zooms scale about the centre.
SHIFT = 4 / 128
ZOOMS = (0.92, 1.0, 1.08)
VARIANTS: tuple[tuple[float, float, float], ...] = tuple(
    (dx * SHIFT, dy * SHIFT, zoom) for dx, dy in itertools.product((-1, 0, 1), repeat=2) for zoom in ZOOMS
)


def transformed(x: torch.Tensor, dx: float, dy: float, zoom: float) -> torch.Tensor:
    """``x`` (n, C, H, W) zoomed by ``zoom`` about its centre and shifted by (dx, dy) of its side; what
    comes in from outside repeats the border (a zero padding would add an edge the layout sees)."""
    theta = torch.tensor(
        [[1 / zoom, 0.0, -2 * dx / zoom], [0.0, 1 / zoom, -2 * dy / zoom]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


@torch.no_grad()
def variant_keys(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unit re-ranking keys of every variant of network inputs ``x`` (n, C, H, W): ``(n, V, dims)``.

    ``model`` is a DRH or DMIH with a layout path (``(n, 0, 0)`` without one: its re-ranking key is
    the relaxed code, which has no spatial meaning to shift). The layout standardises each image, so
    the inputs' normalisation does not change the keys.
    """
    layout = model.encoder.layout
    if layout is None:
        return torch.zeros(len(x), 0, 0)
    # Resampled at half the input's side: the layout averages far coarser cells (16 x 16) anyway. The
    # 2 x 2 area average is exact for the untransformed variant (area averages compose); the others'
    # keys keep a cosine of 0.999 on average (0.986 at worst, 48 test fixtures) to resampling the full
    # input, which takes four times the samples and about four times the time. On validation: the
    # split codes' recall 0.213 against 0.210 at full size, v3's 0.181 against 0.184 (noise).
    half = F.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 2 * layout.side else x
    keys = [F.normalize(layout(transformed(half, *v)), dim=-1) for v in VARIANTS]
    return torch.stack(keys, dim=1).float()
