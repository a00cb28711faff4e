"""Residual networks for single-channel medical images (the instance encoder of DRH and DMIH).

He et al. 2016's layout (a stem, four stages of basic blocks, global pooling) with depth, width and
stem as typed keyword arguments, so a checkpoint records them and rebuilds the exact network. The
default model is a ResNet-18 at half width (:func:`resnet18_half`): 128 px radiographs keep what a
radiologist looks at, and it trains on a 2-core CPU in the time budget of the model card.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


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


class ResNet(nn.Module):
    """Stem, stages of basic blocks (each stage after the first halves the resolution), global pooling.

    ``forward_features`` returns the pooled feature vector (``num_features`` wide); heads live in the
    models that use this encoder (:mod:`hashing.drh`, :mod:`hashing.dmih`).
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
        self.num_features = prev
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> pooled features ``(B, num_features)``."""
        x = self.stages(self.stem(x))
        return torch.flatten(self.pool(x), 1)

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


# ResNet-18's layout (5x5 stem at stride 2, max-pool, 2 blocks per stage) at half its width: 2.8 M
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
