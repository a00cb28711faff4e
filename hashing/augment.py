"""Random views of radiographs for training: what the codes must not care about.

Two views of one image differ by what differs between two films of the same anatomy: framing (a
crop of 65-100 % of the area, a small shift), a few degrees of rotation, exposure (contrast,
brightness, gamma) and noise. Never a flip: it would mirror the anatomy (the heart's side), which a
radiologist would not call similar. One affine warp per batch (``grid_sample``) keeps this cheap on a
CPU. Every draw comes from the generator passed in, so a resumed training repeats it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_views(
    x_u8: torch.Tensor,
    gen: torch.Generator,
    *,
    min_area: float = 0.65,
    max_degrees: float = 8.0,
    max_shift: float = 0.06,
    contrast: float = 0.25,
    brightness: float = 0.08,
    gamma: float = 0.25,
    noise: float = 0.02,
) -> torch.Tensor:
    """``(N, 1, S, S)`` uint8 model inputs -> float views in [0, 1] of the same shape."""
    n = x_u8.shape[0]
    x = x_u8.float() / 255.0

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    scale = torch.sqrt(uniform(min_area, 1.0))  # side of the crop, as a fraction of the image
    aspect = torch.exp(uniform(-0.1, 0.1))
    sx, sy = scale * torch.sqrt(aspect), scale / torch.sqrt(aspect)
    angle = uniform(-max_degrees, max_degrees) * math.pi / 180.0
    room_x, room_y = (1.0 - sx).clamp_min(0.0), (1.0 - sy).clamp_min(0.0)
    tx = uniform(-1.0, 1.0) * (room_x + max_shift)
    ty = uniform(-1.0, 1.0) * (room_y + max_shift)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([sx * cos, -sy * sin, tx], dim=1), torch.stack([sx * sin, sy * cos, ty], dim=1)], dim=1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    g = torch.exp(uniform(-gamma, gamma)).view(n, 1, 1, 1)
    x = x.clamp(0.0, 1.0) ** g
    c = uniform(1.0 - contrast, 1.0 + contrast).view(n, 1, 1, 1)
    b = uniform(-brightness, brightness).view(n, 1, 1, 1)
    m = x.mean(dim=(2, 3), keepdim=True)
    x = (x - m) * c + m + b
    if noise > 0:
        x = x + torch.randn(x.shape, generator=gen) * noise * torch.rand(n, 1, 1, 1, generator=gen)
    return x.clamp(0.0, 1.0)


def light_view(x_u8: torch.Tensor, gen: torch.Generator, shift: int = 4) -> torch.Tensor:
    """A mild view (translation and a little exposure jitter) for label-only training, in [0, 1]."""
    n, _, h, w = x_u8.shape
    padded = F.pad(x_u8.float() / 255.0, (shift, shift, shift, shift))
    offs = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
    out = torch.stack([padded[i, :, oy : oy + h, ox : ox + w] for i, (oy, ox) in enumerate(offs.tolist())])
    c = 1.0 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.3
    b = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.1
    m = out.mean(dim=(2, 3), keepdim=True)
    return ((out - m) * c + m + b).clamp(0, 1)
