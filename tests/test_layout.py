"""The layout path: a PCA-whitened 16 x 16 thumbnail, fitted on training images, saved with the model;
and the code bits fitted on it (a split code's ITQ part)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hashing import checkpoint
from hashing.baselines import fit_itq
from hashing.bits import binarize, pack
from hashing.drh import DRH, drh_resnet18_half, drh_resnet18_layout
from hashing.encoder import dmih_from_drh
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


def test_layout_bits_are_itq_of_the_fitted_layout_and_follow_the_learned_bits(tmp_path: Path) -> None:
    """A split code: the hash layer learns the first bits, the last ones are ITQ of the whitened
    layout (the baselines' own ITQ), and both survive a checkpoint."""
    model = DRH(nbits=32, backbone=drh_resnet18_layout(32).backbone_args, layout_bits=16)
    assert model.learned_bits == 16 and model.hash.out_features == 16
    x = _images(400)
    model.encoder.layout.fit([x])
    layouts = model.encoder.layout(x)
    model.layout_hash.fit(layouts, seed=3)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x[:50])
        h = model.forward_head(feats)
    assert h.shape == (50, 32)
    assert torch.equal(h[:, :16], model.hash(feats))
    itq = fit_itq(layouts.double().numpy(), 16, seed=3)
    assert np.array_equal(pack(binarize(h[:, 16:].numpy())), itq.encode(layouts[:50].double().numpy()))
    # The fitted bits are buffers: saved with the model, never given to the optimiser.
    assert not any("layout_hash" in name for name, _ in model.named_parameters())
    path = tmp_path / "split.pt"
    checkpoint.save({"drh": checkpoint.module_entry(model)}, path)
    again = checkpoint.build_module(torch.load(path, weights_only=True)["drh"]).eval()
    assert again.arch()["layout_bits"] == 16
    with torch.no_grad():
        assert torch.equal(again.forward_head(again.forward_features(x[:50])), h)
    # A study of one image gets that image's code, the fitted bits included.
    dmih = dmih_from_drh(again).eval()
    with torch.no_grad():
        study, _ = dmih.forward_bag_pooled(feats[:1].unsqueeze(0))
    assert torch.allclose(study[0], h[0], atol=1e-5)


def test_layout_bits_need_a_layout_path_and_leave_learned_bits() -> None:
    with pytest.raises(ValueError, match="layout path"):
        DRH(nbits=32, backbone=drh_resnet18_half(32).backbone_args, layout_bits=8)
    with pytest.raises(ValueError, match="at least one"):
        DRH(nbits=32, backbone=drh_resnet18_layout(32).backbone_args, layout_bits=32)
