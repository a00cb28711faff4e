"""Running a network over a whole image set, for training's validation and for ``drh-pacs evaluate``.

Model inputs come as the uint8 tensor of :mod:`hashing.data` and are normalised with
:func:`hashing.encoder.to_input`, the serving formula; batches are large and the network is in eval
mode, as in a worker.
"""

from __future__ import annotations

import torch

from hashing.dmih import DMIH
from hashing.drh import DRH, layout_dims, rerank_key
from hashing.encoder import to_input
from hashing.variants import variant_keys


@torch.no_grad()
def encode_set(
    model: DRH | DMIH, images: torch.Tensor, mean: float, std: float, device: torch.device, bs: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """(backbone features, hash-layer pre-activations) of a uint8 image tensor, in eval mode.

    For a DMIH the pre-activations are its instance arm's (``instance_pre``).
    """
    model.eval()
    feats, heads = [], []
    for s in range(0, len(images), bs):
        x = to_input(images[s : s + bs], mean, std).to(device)
        f = model.forward_features(x)
        feats.append(f.float().cpu())
        heads.append((model.forward_head(f) if isinstance(model, DRH) else model.instance_pre(f)).float().cpu())
    if not feats:
        return torch.zeros(0, model.num_features), torch.zeros(0, model.nbits)
    return torch.cat(feats), torch.cat(heads)


@torch.no_grad()
def variant_set(
    model: DRH | DMIH, images: torch.Tensor, mean: float, std: float, device: torch.device, bs: int = 256
) -> torch.Tensor:
    """The query variants' re-ranking keys (:func:`hashing.variants.variant_keys`) of a uint8 image
    tensor: ``(n, V, dims)``, ``(n, 0, 0)`` for a model without a layout path."""
    model.eval()
    parts = [
        variant_keys(model, to_input(images[s : s + bs], mean, std).to(device)).cpu() for s in range(0, len(images), bs)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, 0, 0)


@torch.no_grad()
def pool_bags(
    model: DMIH, feats: torch.Tensor, bags: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Study-level pre-activations for each bag from instance features (padded + masked batches), and
    the studies' re-ranking keys."""
    model.eval()
    out, keys = [], []
    for s in range(0, len(bags), 256):
        chunk = bags[s : s + 256]
        m = max(len(b) for b in chunk)
        x = torch.zeros(len(chunk), m, feats.shape[1])
        mask = torch.zeros(len(chunk), m, dtype=torch.bool)
        for i, b in enumerate(chunk):
            x[i, : len(b)] = feats[b]
            mask[i, : len(b)] = True
        h, pooled = model.forward_bag_pooled(x.to(device), mask.to(device))
        out.append(h.float().cpu())
        keys.append(rerank_key(h, pooled, layout_dims(model)).float().cpu())
    if not out:
        return torch.zeros(0, model.nbits), torch.zeros(0, 0)
    return torch.cat(out), torch.cat(keys)


def image_keys(model: DRH | DMIH, feats: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Re-ranking keys of images from :func:`encode_set`'s output."""
    return rerank_key(heads, feats, layout_dims(model))
