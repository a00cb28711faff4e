"""DRH: deep residual hashing of single images.

A :class:`~hashing.resnet.ResNet` encoder, then a linear hash layer of K bits. In training the layer's
output is relaxed with ``tanh`` so the losses (:mod:`hashing.losses`) have gradients; at inference the
code is ``h >= 0`` (:func:`hashing.bits.binarize`), which equals the sign of the relaxed code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hashing.bits import VALID_NBITS
from hashing.resnet import RESNET18_HALF, ResNet


class DRH(nn.Module):
    """Residual encoder + K-bit hash layer.

    ``forward_features`` gives the float embedding before the hash layer (the non-hashing reference
    and the input of the LSH/ITQ baselines); ``forward_head`` gives the pre-activation ``h``;
    ``forward`` gives the relaxed code ``tanh(h)``.
    """

    def __init__(self, *, nbits: int = 64, backbone: dict[str, Any] | None = None) -> None:
        super().__init__()
        if nbits not in VALID_NBITS:
            raise ValueError(f"nbits must be one of {VALID_NBITS}, got {nbits}")
        self.nbits = nbits
        self.backbone_args = dict(backbone or {})
        self.encoder = ResNet(**self.backbone_args)
        self.num_features = self.encoder.num_features
        self.hash = nn.Linear(self.num_features, nbits)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-activation of the hash layer; its sign (``>= 0``) is the code."""
        return self.hash(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Relaxed code in (-1, 1) for training."""
        return torch.tanh(self.forward_head(self.forward_features(x)))

    def arch(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this network (stored in checkpoints)."""
        return {"nbits": self.nbits, "backbone": dict(self.backbone_args)}


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
    """The default model: ResNet-18's layout at half width (:data:`hashing.resnet.RESNET18_HALF`)."""
    return DRH(nbits=nbits, backbone={**RESNET18_HALF, **backbone})


MODELS = {
    "drh_tiny": drh_tiny,
    "drh_small": drh_small,
    "drh_resnet10": drh_resnet10,
    "drh_resnet18_half": drh_resnet18_half,
}
