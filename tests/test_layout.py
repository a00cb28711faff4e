"""The layout path: a PCA-whitened 16 x 16 thumbnail, fitted on training images, saved with the model."""

from __future__ import annotations

from pathlib import Path

import torch

from hashing import checkpoint
from hashing.drh import drh_resnet18_layout
from hashing.resnet import LayoutPath


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images: a few blobs each, so the 16 x 16 thumbnails have structure to whiten."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    out = torch.zeros(n, 1, 64, 64)
    for _ in range(4):
        cx, cy, w = torch.rand(3, n, 1, 1, generator=gen)
        out[:, 0] += torch.exp(-((xx - (2 * cx - 1)) ** 2 + (yy - (2 * cy - 1)) ** 2) / (0.05 + 0.3 * w))
    return out + 0.01 * torch.randn(out.shape, generator=gen)


def test_whitened_training_images_have_unit_variance_and_no_correlation() -> None:
    x = _images(600)
    path = LayoutPath(dims=32, side=16)
    path.fit(x.split(128), ridge=0.0)
    w = (path.thumbnails(x) - path.mean) @ path.projection.T  # before the layer norm
    cov = torch.cov(w.T)
    assert torch.allclose(torch.diagonal(cov), torch.ones(32), atol=1e-3)
    off = cov - torch.diag(torch.diagonal(cov))
    assert off.abs().max() < 1e-3
    # The default ridge shrinks the weakest directions only.
    path.fit(x.split(128))
    var = torch.diagonal(torch.cov(((path.thumbnails(x) - path.mean) @ path.projection.T).T))
    assert var[0] > 0.99 and (var <= 1.0 + 1e-4).all() and var[-1] < var[0]


def test_the_layout_ignores_window_and_level() -> None:
    x = _images(300)
    path = LayoutPath(dims=16, side=16)
    path.fit([x])
    assert torch.allclose(path(x[:5]), path(3.0 * x[:5] - 7.0), atol=1e-4)


def test_fewer_images_than_dimensions_still_fit_without_blowing_up() -> None:
    path = LayoutPath(dims=128, side=16)
    path.fit([_images(40)])
    out = path(_images(10, seed=1))
    assert torch.isfinite(out).all() and out.shape == (10, 128)
    assert (path.projection[40:] == 0).all()  # 40 images span at most 39 directions


def test_the_fitted_layout_is_saved_in_the_checkpoint_and_not_trained(tmp_path: Path) -> None:
    model = drh_resnet18_layout(64)
    model.encoder.layout.fit([_images(300)])
    assert not any("layout" in name for name, _ in model.named_parameters())
    path = tmp_path / "m.pt"
    checkpoint.save({"drh": checkpoint.module_entry(model)}, path)
    again = checkpoint.build_module(torch.load(path, weights_only=True)["drh"])
    assert torch.equal(again.encoder.layout.projection, model.encoder.layout.projection)
    x = _images(4, seed=2)
    model.eval(), again.eval()
    assert torch.allclose(model(x), again(x))
