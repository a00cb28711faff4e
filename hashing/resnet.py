"""Residual networks for single-channel medical images (the instance encoder of DRH and DMIH).

He et al. 2016's layout (a stem, four stages of basic blocks, global pooling) with depth, width and
stem as typed keyword arguments, so a checkpoint records them and rebuilds the exact network. The
default model is a ResNet-18 at half width (:func:`resnet18_half`): 128 px radiographs keep what a
radiologist looks at, and it trains on a 2-core CPU in the time budget of the model card.

Global pooling keeps *what* is in an image and throws away *where*: two films of one patient share
their layout (body outline, positioning, the heart's and diaphragm's shape) more than their
textures. An optional layout path (:class:`LayoutPath`) gives the hash layer the image's grey levels
at 16 x 16, whitened, beside the pooled features.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from hashing.baselines import fit_itq


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut, as in He et al. 2016."""

    def __init__(self, *, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        # Zero-init the last BN so each block starts as identity: stabler training of small nets.
        nn.init.zeros_(self.bn2.weight)
        self.act = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.downsample(x))


class LayoutPath(nn.Module):
    """The image's layout: its ``side x side`` area average, standardised per image and PCA-whitened.

    Whitening (Jegou & Chum, ECCV 2012) is what makes a thumbnail find the same patient: the few
    directions of largest variance (exposure, inspiration, framing) are shared by most films, and a
    patient's own shape lives in the many smaller ones; scaling each principal direction to unit
    variance lets those count. On held-out chest radiographs it raised the same-patient recall@10 of
    a 16 x 16 thumbnail from 0.14 to 0.24 (hashing/weights/MODEL_CARD.md).

    The whitening is *fitted* on training images (:meth:`fit`), like a normalisation, not learned by
    gradient: it is kept in buffers (saved in checkpoints, never updated by the optimiser) and the
    output is layer-normalised so the hash layer sees it at the scale of the residual features.
    Standardising per image makes it blind to window and level.
    """

    def __init__(self, *, dims: int = 128, side: int = 16) -> None:
        super().__init__()
        if dims > side * side:
            raise ValueError(f"a {side}x{side} layout has at most {side * side} dimensions, not {dims}")
        self.dims = dims
        self.side = side
        self.register_buffer("mean", torch.zeros(side * side))
        self.register_buffer("projection", torch.zeros(dims, side * side))

    def thumbnails(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.flatten(nn.functional.adaptive_avg_pool2d(x, self.side), 1)
        t = t - t.mean(dim=1, keepdim=True)
        return t / t.std(dim=1, keepdim=True).clamp_min(1e-6)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor], ridge: float = 0.01) -> None:
        """PCA-whitening from batches of network inputs ``(n, C, H, W)``: the mean and the top ``dims``
        principal directions, each scaled to unit variance.

        Each variance gets ``ridge`` times their mean added (regularised whitening): with thousands of
        images it changes nothing measurable, with a hundred it keeps directions the few images barely
        span from being amplified into noise (same-patient recall@10 of a whitening fitted on 100
        radiographs: 0.01 without, 0.17 with). Fewer images than ``dims`` leave the rest zero.
        """
        t = torch.cat([self.thumbnails(b.float()) for b in batches]).double()
        if len(t) < 2:
            raise ValueError("fitting the layout path needs at least two images")
        mu = t.mean(dim=0)
        _, s, v = torch.linalg.svd(t - mu, full_matrices=False)
        k = min(self.dims, len(s))
        var = s[:k] ** 2 / (len(t) - 1)
        scale = (var + ridge * var.mean()).sqrt().clamp_min(1e-12)
        projection = torch.zeros_like(self.projection, dtype=torch.float64)
        projection[:k] = v[:k] / scale[:, None]
        self.mean.copy_(mu.to(self.mean))
        self.projection.copy_(projection.to(self.projection))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.thumbnails(x) - self.mean) @ self.projection.T
        return nn.functional.layer_norm(w, (self.dims,))


class LayoutBits(nn.Module):
    """Code bits *fitted* on the whitened layout instead of learned: ITQ (Gong & Lazebnik, CVPR 2011)
    of the layout path's output, i.e. its top principal directions rotated to lose least to the sign.

    What for (``drh-pacs train --layout-bits N``): a split code, whose learned bits follow the labels
    while these keep what looks alike. A hash layer asked to distil the layout's neighbourhoods beside
    NCA (:func:`hashing.losses.neighbourhood_distillation`) keeps them less well than ITQ of the same
    layout as the shortlist tightens (at a million images 300 codes are 0.03 % of the archive): on the
    shipped model's validation split, same-patient recall@10 served from 100-code shortlists 0.100
    with v3's codes, 0.142 with 64 ITQ bits. Trained split models did not keep that advantage once
    half their bits learned the labels, and were not shipped (hashing/weights/MODEL_CARD.md, "Not
    shipped: split codes"). Fitted once on the training images after :meth:`LayoutPath.fit`, kept in
    buffers, never touched by the optimiser.
    """

    def __init__(self, *, dims: int, bits: int) -> None:
        super().__init__()
        if not 0 < bits <= dims:
            raise ValueError(f"layout bits must be between 1 and the layout's {dims} dimensions, not {bits}")
        self.dims = dims
        self.bits = bits
        self.register_buffer("mean", torch.zeros(dims))
        self.register_buffer("projection", torch.zeros(dims, bits))

    @torch.no_grad()
    def fit(self, layouts: torch.Tensor, seed: int = 0) -> None:
        """ITQ on layout path outputs ``(n, dims)`` of the training images (the baselines' ITQ)."""
        fitted = fit_itq(layouts.double().cpu().numpy(), self.bits, seed=seed)
        self.mean.copy_(torch.as_tensor(fitted.mean).to(self.mean))
        self.projection.copy_(torch.as_tensor(fitted.projection).to(self.projection))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-activations (sign = bit) from features whose last ``dims`` values are the layout."""
        return (features[..., -self.dims :] - self.mean) @ self.projection


class ResNet(nn.Module):
    """Stem, stages of basic blocks (each stage after the first halves the resolution), global pooling.

    ``forward_features`` returns the pooled feature vector, followed by the layout path's output when
    ``layout`` > 0 (``num_features`` wide in all); heads live in the models that use this encoder
    (:mod:`hashing.drh`, :mod:`hashing.dmih`).
    """

    def __init__(
        self,
        *,
        in_chans: int = 1,
        stem_width: int = 16,
        stem_stride: int = 2,
        stem_kernel: int = 3,
        stem_pool: bool = False,
        widths: Sequence[int] = (16, 32, 64, 128),
        depths: Sequence[int] = (1, 1, 1, 1),
        layout: int = 0,
        layout_side: int = 16,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError("widths and depths must have the same length")
        stem: list[nn.Module] = [
            nn.Conv2d(in_chans, stem_width, stem_kernel, stride=stem_stride, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        ]
        if stem_pool:  # as in He et al.: the stages start at a quarter of the input's side
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem)
        stages: list[nn.Module] = []
        prev = stem_width
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_chs=prev, out_chs=width, stride=stride))
                prev = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.layout = LayoutPath(dims=layout, side=layout_side) if layout else None
        self.num_features = prev + layout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> pooled features (and layout) ``(B, num_features)``."""
        pooled = torch.flatten(self.pool(self.stages(self.stem(x))), 1)
        if self.layout is None:
            return pooled
        return torch.cat([pooled, self.layout(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def resnet_tiny(**kwargs: object) -> ResNet:
    """~0.4 M parameters: the default encoder (64 px input, CPU training)."""
    return ResNet(**{"stem_width": 16, "widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1), **kwargs})


def resnet_small(**kwargs: object) -> ResNet:
    """~1.6 M parameters: for GPU training or larger inputs."""
    return ResNet(**{"stem_width": 32, "widths": (32, 64, 128, 256), "depths": (1, 1, 1, 1), **kwargs})


def resnet10(**kwargs: object) -> ResNet:
    """~5 M parameters: two blocks per stage."""
    return ResNet(**{"stem_width": 32, "widths": (32, 64, 128, 256), "depths": (2, 2, 2, 2), **kwargs})


# ResNet-18's design (5x5 stem at stride 2, max-pool, 2 blocks per stage) at half its width: 2.8 M
# parameters, ~220 images/s of 128 px on 2 CPU threads (drh-pacs bench model).
RESNET18_HALF = {
    "stem_width": 32,
    "stem_kernel": 5,
    "stem_pool": True,
    "widths": (32, 64, 128, 256),
    "depths": (2, 2, 2, 2),
}


def resnet18_half(**kwargs: object) -> ResNet:
    return ResNet(**{**RESNET18_HALF, **kwargs})


# The default: the same residual network with the whitened 16 x 16 layout beside it, 128 of its 256
# dimensions kept (the shipped chest model, v3). Keeping all 256 (drh-pacs train --layout-dims 256)
# raised the layout's own validation same-patient R@10 from 0.152 to 0.197 and the trained model's
# from 0.213 to 0.239, but on the test split the trained model's fell from 0.180 to 0.132: the
# weakest directions of a whitening fitted on one set of films carry less of a patient on others.
# It stays an option, not the default (hashing/weights/MODEL_CARD.md, "Not shipped").
LAYOUT_DIMS = 128
RESNET18_HALF_LAYOUT = {**RESNET18_HALF, "layout": LAYOUT_DIMS, "layout_side": 16}
