"""DMIH: deep multiple-instance hashing of a whole study (a bag of images).

The same instance encoder as DRH, a gated-attention multiple-instance pooling layer (Ilse et al.,
ICML 2018) over the instances of a bag, and a study-level hash layer. An instance-level hash arm
(trained with the bag's label on each instance) guides the encoder early in training; its loss
weight decays to zero (see :mod:`hashing.train`), so the final codes are shaped by bag labels.

Bags have varying sizes: instances are padded to the largest bag of a batch and a boolean ``mask``
says which are real. Attention over padded positions is masked to ``-inf`` before the softmax, so a
bag of one is pooled to exactly its single instance's features.

The pooling works on instance *features*, so the study code can be recomputed from stored
per-instance embeddings alone (``forward_bag``) without the pixels: that is what workers do when a
study becomes stable or a late instance arrives.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hashing.bits import VALID_NBITS
from hashing.drh import layout_hash, with_layout_bits
from hashing.resnet import ResNet


class AttentionMILPool(nn.Module):
    """Gated attention pooling: ``a_i = softmax_i(w^T (tanh(V x_i) * sigmoid(U x_i)))``, ``z = sum_i a_i x_i``.

    Permutation-invariant, weights instances by relevance rather than averaging them all equally
    (a study's scout or lateral view should not dilute a frontal finding).
    """

    def __init__(self, *, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, M, D)``, ``mask (B, M)`` bool -> pooled ``(B, D)`` and attention ``(B, M)``."""
        scores = self.w(torch.tanh(self.v(x)) * torch.sigmoid(self.u(x))).squeeze(-1)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=1)
        return torch.einsum("bm,bmd->bd", attn, x), attn


class DMIH(nn.Module):
    """Instance encoder + instance hash arm + attention MIL pooling + study hash layer."""

    def __init__(
        self, *, nbits: int = 64, backbone: dict[str, Any] | None = None, attn_hidden: int = 64, layout_bits: int = 0
    ) -> None:
        super().__init__()
        if nbits not in VALID_NBITS:
            raise ValueError(f"nbits must be one of {VALID_NBITS}, got {nbits}")
        self.nbits = nbits
        self.backbone_args = dict(backbone or {})
        self.attn_hidden = attn_hidden
        self.encoder = ResNet(**self.backbone_args)
        self.num_features = self.encoder.num_features
        # A split code's fitted bits (hashing.resnet.LayoutBits) are shared by both arms: a study's
        # come from its pooled layout as an image's from its own.
        self.layout_bits = layout_bits
        self.layout_hash = layout_hash(self.encoder, nbits, layout_bits)
        self.instance_hash = nn.Linear(self.num_features, nbits - layout_bits)
        self.pool = AttentionMILPool(dim=self.num_features, hidden=attn_hidden)
        self.bag_hash = nn.Linear(self.num_features, nbits - layout_bits)

    @property
    def learned_bits(self) -> int:
        return self.nbits - self.layout_bits

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Instance embeddings ``(N, num_features)``: what workers store per instance."""
        return self.encoder.forward_features(x)

    def forward_instance_head(self, features: torch.Tensor) -> torch.Tensor:
        """Relaxed instance codes (the decaying instance-level arm)."""
        return torch.tanh(self.instance_pre(features))

    def instance_pre(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-activation instance codes (sign = bit)."""
        return with_layout_bits(self.instance_hash(features), self.layout_hash, features)

    def forward_bag(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-activation study codes from ``features (B, M, D)`` and ``mask (B, M)``; code = ``>= 0``."""
        return self.forward_bag_pooled(features, mask)[0]

    def forward_bag_pooled(
        self, features: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activation study codes and the pooled study features they come from (whose layout part
        is the study's re-ranking key, :func:`hashing.drh.rerank_key`)."""
        pooled, _ = self.pool(features, mask)
        return with_layout_bits(self.bag_hash(pooled), self.layout_hash, pooled), pooled

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, M, C, H, W)``, ``mask (B, M)`` -> relaxed bag codes ``(B, K)``, relaxed instance codes ``(n, K)``.

        Only the real (unmasked) instances go through the encoder; instance codes are returned in
        ``mask`` order (row-major over the real positions).
        """
        b, m = mask.shape
        feats_real = self.forward_features(x[mask])
        feats = feats_real.new_zeros(b, m, feats_real.shape[1])
        feats[mask] = feats_real
        return torch.tanh(self.forward_bag(feats, mask)), self.forward_instance_head(feats_real)

    def arch(self) -> dict[str, Any]:
        arch: dict[str, Any] = {
            "nbits": self.nbits,
            "backbone": dict(self.backbone_args),
            "attn_hidden": self.attn_hidden,
        }
        if self.layout_bits:
            arch["layout_bits"] = self.layout_bits
        return arch


def dmih_tiny(nbits: int = 64, **backbone: Any) -> DMIH:
    """Same encoder as :func:`hashing.drh.drh_tiny`."""
    return DMIH(
        nbits=nbits, backbone={"stem_width": 16, "widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1), **backbone}
    )
