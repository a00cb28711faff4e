"""Properties of the hashing losses (unit tests of single functions)."""

from __future__ import annotations

import pytest
import torch

from hashing import losses


def test_quantization_zero_at_plus_minus_one() -> None:
    u = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0]])
    assert float(losses.quantization_loss(u)) == 0.0
    assert float(losses.quantization_loss(u * 0.5)) == pytest.approx(0.25)
    assert float(losses.quantization_loss(torch.zeros(2, 4))) == pytest.approx(1.0)


def test_bit_balance_zero_for_balanced_bits() -> None:
    u = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0]])
    assert float(losses.bit_balance_loss(u)) == 0.0
    assert float(losses.bit_balance_loss(torch.ones(4, 3))) == pytest.approx(1.0)


def test_relaxed_hamming_equals_hamming_on_binary_codes() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.where(torch.rand(5, 16, generator=g) < 0.5, -1.0, 1.0)
    expected = (u[:, None, :] != u[None, :, :]).sum(-1).float()
    torch.testing.assert_close(losses.relaxed_hamming(u), expected)


def test_nca_lower_when_same_class_codes_are_closer() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    a, b = torch.ones(8), -torch.ones(8)
    near = torch.stack([a, a * 0.9, b, b * 0.9])  # classes apart, members together
    far = torch.stack([a, b, a * 0.9, b * 0.9])  # each sample's class-mate on the other side
    assert float(losses.nca_loss(near, labels)) < float(losses.nca_loss(far, labels))


def test_nca_ignores_samples_without_a_class_mate() -> None:
    u = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).tanh()
    assert float(losses.nca_loss(u, torch.tensor([0, 1, 2]))) == 0.0
    with_pair = losses.nca_loss(u, torch.tensor([0, 0, 2]))
    assert float(with_pair) > 0.0


@pytest.mark.parametrize("nbits", [16, 64, 128])
def test_gradients_finite(nbits: int) -> None:
    g = torch.Generator().manual_seed(nbits)
    h = (torch.randn(32, nbits, generator=g) * 20).requires_grad_(True)  # saturated tanh included
    labels = torch.randint(0, 3, (32,), generator=g)
    total, parts = losses.drh_loss(torch.tanh(h), labels)
    total.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(total)
    assert set(parts) == {"nca", "quant", "balance"}
    h2 = torch.randn(32, nbits, generator=g).requires_grad_(True)
    c = losses.csq_centers(3, nbits)
    loss, _ = losses.csq_loss(torch.tanh(h2), labels, c)
    loss.backward()
    assert torch.isfinite(h2.grad).all()


def test_csq_centers_are_far_apart() -> None:
    for nbits in (16, 48, 64):
        c = losses.csq_centers(3, nbits)
        assert c.shape == (3, nbits) and set(c.unique().tolist()) <= {-1.0, 1.0}
        d = losses.relaxed_hamming(c)
        off = d[~torch.eye(3, dtype=torch.bool)]
        assert float(off.min()) >= nbits / 4  # Hadamard rows: exactly K/2; random: about K/2


def test_csq_loss_lower_at_own_center() -> None:
    c = losses.csq_centers(3, 32)
    labels = torch.tensor([0, 1, 2])
    at_center, _ = losses.csq_loss(c * 0.99, labels, c)
    wrong, _ = losses.csq_loss(c[[1, 2, 0]] * 0.99, labels, c)
    assert float(at_center) < float(wrong)


def test_drh_centre_term_uses_labelled_samples_and_balanced_centres() -> None:
    """DRH's centre term: balanced centres (no all-ones row, every centre half +1), far apart; the
    loss is lower at each sample's own centre, ignores unlabelled samples, and joins the parts."""
    c = losses.balanced_centres(3, 32)
    assert c.shape == (3, 32) and c.sum(dim=1).abs().max() == 0
    assert float(losses.relaxed_hamming(c)[~torch.eye(3, dtype=torch.bool)].min()) == 16
    labels = torch.tensor([0, 1, 2, -1])
    u = torch.cat([c * 0.99, -c[:1] * 0.99])  # the unlabelled one far from every centre
    wrong = torch.cat([c[[1, 2, 0]] * 0.99, -c[:1] * 0.99])
    own = losses.centre_loss(u, labels, c)
    assert float(own) < float(losses.centre_loss(wrong, labels, c))
    assert float(own) == pytest.approx(float(losses.centre_loss(u[:3], labels[:3], c)))
    assert float(losses.centre_loss(u, torch.full((4,), -1), c)) == 0.0
    total, parts = losses.drh_loss(u, labels, centres=c, w_centre=1.0)
    assert set(parts) == {"nca", "centre", "quant", "balance"} and torch.isfinite(total)
    assert "centre" not in losses.drh_loss(u, labels, centres=c)[1]  # weight 0 by default


def test_instance_arm_weight_decays_to_zero() -> None:
    w = [losses.instance_arm_weight(e, 10) for e in range(11)]
    assert w[0] == pytest.approx(1.0) and w[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(w, w[1:], strict=False))


def test_contrast_pulls_two_views_together_and_films_of_one_patient_with_groups() -> None:
    torch.manual_seed(0)
    base = torch.sign(torch.randn(6, 32))
    views = base + 0.1 * torch.randn(6, 32)
    # two views that agree cost less than two that do not
    assert float(losses.contrastive_loss(base, views)) < float(losses.contrastive_loss(base, torch.randn(6, 32)))
    # images 0 and 1 belong to one patient: with groups, codes that are close for them cost less
    close = base.clone()
    close[1] = close[0]
    groups = torch.tensor([0, 0, 1, 2, 3, 4])
    apart = base.clone()
    assert float(losses.contrastive_loss(close, close, groups=groups)) < float(
        losses.contrastive_loss(apart, apart, groups=groups)
    )
    # without groups the same closeness is a confusion, not a positive: it costs more
    assert float(losses.contrastive_loss(close, close)) > float(losses.contrastive_loss(apart, apart))


def test_drh_loss_without_labels_is_the_contrast_and_the_code_terms() -> None:
    torch.manual_seed(1)
    u, v = torch.tanh(torch.randn(8, 16)), torch.tanh(torch.randn(8, 16))
    total, parts = losses.drh_loss(u, torch.full((8,), -1), v=v, w_contrast=1.0)
    assert "nca" not in parts and set(parts) == {"contrast", "quant", "balance"}
    assert float(total) == pytest.approx(parts["contrast"] + 0.1 * parts["quant"] + 0.1 * parts["balance"], rel=1e-5)


def test_distillation_is_lowest_when_the_codes_keep_the_teachers_neighbours() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 32, generator=gen)
    projection = torch.randn(32, 64, generator=gen)
    keeps = torch.tanh(teacher @ projection / 4)  # codes whose neighbourhoods follow the teacher's
    shuffled = keeps[torch.randperm(16, generator=gen)]  # the same codes, given to the wrong images
    good = losses.neighbourhood_distillation(keeps, teacher)
    bad = losses.neighbourhood_distillation(shuffled, teacher)
    assert good < bad
    # The teacher gets no gradient: it is a target.
    t = teacher.clone().requires_grad_(True)
    u = keeps.clone().requires_grad_(True)
    losses.neighbourhood_distillation(u, t).backward()
    assert t.grad is None and u.grad is not None and torch.isfinite(u.grad).all()


def test_drh_loss_distils_only_with_a_teacher() -> None:
    u = torch.tanh(torch.randn(8, 16))
    no_labels = torch.full((8,), -1)
    _, without = losses.drh_loss(u, no_labels, w_distill=1.0)
    _, with_teacher = losses.drh_loss(u, no_labels, w_distill=1.0, teacher=torch.randn(8, 32))
    assert "distill" not in without and with_teacher["distill"] > 0
