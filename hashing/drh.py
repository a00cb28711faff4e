"""DRH: deep residual hashing of single images.

A :class:`~hashing.resnet.ResNet` encoder, then a linear hash layer of K bits. In training the layer's
output is relaxed with ``tanh`` so the losses (:mod:`hashing.losses`) have gradients; at inference the
code is ``h >= 0`` (:func:`hashing.bits.binarize`), which equals the sign of the relaxed code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hashing.bits import VALID_NBITS
from hashing.resnet import RESNET18_HALF, RESNET18_HALF_LAYOUT, LayoutBits, ResNet


def rerank_dim(nbits: int, layout_dims: int) -> int:
    """Values per re-ranking vector of a model (what the store keeps per image)."""
    return layout_dims or nbits


def rerank_key(h: torch.Tensor, features: torch.Tensor, layout_dims: int) -> torch.Tensor:
    """The float vector a Hamming shortlist is re-sorted by (cosine), from the hash layer's
    pre-activation ``h`` and the features it was computed from.

    Without a layout path it is the relaxed code ``tanh(h)``: the continuous version of the distance
    the codes were trained for. With one it is the whitened layout, the neighbourhood structure the
    codes were trained to keep (:func:`hashing.losses.neighbourhood_distillation`): the codes find the
    shortlist, and the teacher, which 64 bits only approximate, orders it. Joining the relaxed code to
    it did worse on validation (same-patient recall@10 0.206 at 10 % code weight, 0.177 at 50 %,
    against 0.216 for the layout alone, on the shipped model's validation split, 300 shortlist).
    """
    if not layout_dims:
        return torch.tanh(h)
    return F.normalize(features[..., -layout_dims:], dim=-1)


def layout_dims(model: nn.Module) -> int:
    """Width of a DRH's or DMIH's layout path (0: none)."""
    layout = model.encoder.layout
    return 0 if layout is None else int(layout.dims)


def layout_hash(encoder: ResNet, nbits: int, layout_bits: int) -> LayoutBits | None:
    """The fitted part of a split code (:class:`hashing.resnet.LayoutBits`), None for a learned one."""
    if not layout_bits:
        return None
    if encoder.layout is None:
        raise ValueError(
            "layout bits need a network with a layout path (--arch drh_resnet18_layout, or --layout-dims N)"
        )
    if not 0 < layout_bits < nbits:
        raise ValueError(f"layout bits must leave the hash layer at least one of the {nbits} bits, not {layout_bits}")
    return LayoutBits(dims=encoder.layout.dims, bits=layout_bits)


def with_layout_bits(h: torch.Tensor, fitted: LayoutBits | None, features: torch.Tensor) -> torch.Tensor:
    """A learned hash layer's pre-activations followed by the fitted layout bits' (when the code is split)."""
    return h if fitted is None else torch.cat([h, fitted(features)], dim=-1)


class DRH(nn.Module):
    """Residual encoder + K-bit hash layer.

    ``forward_features`` gives the float embedding before the hash layer (the non-hashing reference
    and the input of the LSH/ITQ baselines); ``forward_head`` gives the pre-activation ``h``;
    ``forward`` gives the relaxed code ``tanh(h)``.
    """

    def __init__(self, *, nbits: int = 64, backbone: dict[str, Any] | None = None, layout_bits: int = 0) -> None:
        super().__init__()
        if nbits not in VALID_NBITS:
            raise ValueError(f"nbits must be one of {VALID_NBITS}, got {nbits}")
        self.nbits = nbits
        self.backbone_args = dict(backbone or {})
        self.encoder = ResNet(**self.backbone_args)
        self.num_features = self.encoder.num_features
        self.layout_bits = layout_bits
        self.layout_hash = layout_hash(self.encoder, nbits, layout_bits)
        self.hash = nn.Linear(self.num_features, nbits - layout_bits)

    @property
    def learned_bits(self) -> int:
        """How many of the code's bits the hash layer learns (the first ones; the rest are fitted)."""
        return self.nbits - self.layout_bits

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-activation of the hash layer; its sign (``>= 0``) is the code."""
        return with_layout_bits(self.hash(features), self.layout_hash, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Relaxed code in (-1, 1) for training."""
        return torch.tanh(self.forward_head(self.forward_features(x)))

    def arch(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this network (stored in checkpoints)."""
        arch: dict[str, Any] = {"nbits": self.nbits, "backbone": dict(self.backbone_args)}
        if self.layout_bits:
            arch["layout_bits"] = self.layout_bits
        return arch


def drh_tiny(nbits: int = 64, **backbone: Any) -> DRH:
    """The default model: narrow 4-stage ResNet (16-128 channels), one block per stage."""
    return DRH(
        nbits=nbits, backbone={"stem_width": 16, "widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1), **backbone}
    )


def drh_small(nbits: int = 64, **backbone: Any) -> DRH:
    return DRH(
        nbits=nbits, backbone={"stem_width": 32, "widths": (32, 64, 128, 256), "depths": (1, 1, 1, 1), **backbone}
    )


def drh_resnet10(nbits: int = 64, **backbone: Any) -> DRH:
    return DRH(
        nbits=nbits, backbone={"stem_width": 32, "widths": (32, 64, 128, 256), "depths": (2, 2, 2, 2), **backbone}
    )


def drh_resnet18_half(nbits: int = 64, **backbone: Any) -> DRH:
    """ResNet-18's design at half width (:data:`hashing.resnet.RESNET18_HALF`)."""
    return DRH(nbits=nbits, backbone={**RESNET18_HALF, **backbone})


def drh_resnet18_layout(nbits: int = 64, **backbone: Any) -> DRH:
    """The default model: :func:`drh_resnet18_half` with the whitened layout path
    (:class:`hashing.resnet.LayoutPath`) beside its pooled features."""
    return DRH(nbits=nbits, backbone={**RESNET18_HALF_LAYOUT, **backbone})


MODELS = {
    "drh_tiny": drh_tiny,
    "drh_small": drh_small,
    "drh_resnet10": drh_resnet10,
    "drh_resnet18_half": drh_resnet18_half,
    "drh_resnet18_layout": drh_resnet18_layout,
}
