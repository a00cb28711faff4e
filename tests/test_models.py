"""Networks: configurable ResNet, DRH heads, DMIH pooling with masks and bags of any size."""

from __future__ import annotations

import pytest
import torch

from hashing.dmih import DMIH, dmih_tiny
from hashing.drh import DRH, drh_tiny
from hashing.resnet import ResNet


def test_resnet_depth_width_and_input_size() -> None:
    net = ResNet(stem_width=8, widths=(8, 16, 24), depths=(2, 1, 3))
    assert net.num_features == 24
    assert sum(len(s) for s in net.stages) == 6
    for size in (32, 48, 65):
        assert net.forward_features(torch.zeros(2, 1, size, size)).shape == (2, 24)
    with pytest.raises(ValueError):
        ResNet(widths=(8, 16), depths=(1,))


@pytest.mark.parametrize("nbits", [16, 32, 48, 64, 128])
def test_drh_code_lengths(nbits: int) -> None:
    model = drh_tiny(nbits).eval()
    x = torch.randn(3, 1, 40, 40)
    with torch.no_grad():
        feats = model.forward_features(x)
        u = model(x)
        head = model.forward_head(feats)
    assert feats.shape == (3, model.num_features)
    assert u.shape == (3, nbits) and float(u.abs().max()) < 1.0
    torch.testing.assert_close(u, torch.tanh(head))


def test_drh_rejects_bad_code_length() -> None:
    with pytest.raises(ValueError):
        DRH(nbits=24)


def test_dmih_bag_of_one_is_its_instance() -> None:
    model = dmih_tiny(32).eval()
    feats = torch.randn(1, 1, model.num_features)
    with torch.no_grad():
        pooled, attn = model.pool(feats, torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(pooled, feats[:, 0])
    assert float(attn) == pytest.approx(1.0)


def test_dmih_padding_is_ignored_and_order_irrelevant() -> None:
    torch.manual_seed(0)
    model = dmih_tiny(16).eval()
    d = model.num_features
    a, b = torch.randn(3, d), torch.randn(1, d)
    # Bag a (3 instances) and bag b (1 instance, padded with garbage) in one batch.
    batch = torch.stack([a, torch.cat([b, torch.full((2, d), 1e3)])])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    together = model.forward_bag(batch, mask)
    alone_a = model.forward_bag(a[None], torch.ones(1, 3, dtype=torch.bool))
    alone_b = model.forward_bag(b[None], torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(together[0], alone_a[0])
    torch.testing.assert_close(together[1], alone_b[0])
    torch.testing.assert_close(model.forward_bag(a.flip(0)[None], torch.ones(1, 3, dtype=torch.bool)), alone_a)


def test_dmih_forward_on_images_with_varying_bags() -> None:
    torch.manual_seed(1)
    model = DMIH(nbits=16, backbone={"stem_width": 8, "widths": (8, 16), "depths": (1, 1)}).eval()
    mask = torch.tensor([[True, True, False], [True, False, False], [True, True, True]])
    x = torch.randn(3, 3, 1, 32, 32)
    bag_u, inst_u = model(x, mask)
    assert bag_u.shape == (3, 16) and inst_u.shape == (int(mask.sum()), 16)
    # The single-image bag equals encoding that image alone.
    single, _ = model(x[1:2, :1], torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(bag_u[1], single[0], rtol=1e-4, atol=1e-5)
    loss = bag_u.sum() + inst_u.sum()
    model.train()
    bag_u, inst_u = model(x, mask)
    (bag_u.pow(2).sum() + inst_u.pow(2).sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(loss)
