"""Losses for deep hashing on relaxed codes ``u`` in (-1, 1)^K (``tanh`` of the hash layer).

DRH's objective (:func:`drh_loss`, weights configurable in :mod:`hashing.train`)::

    L = w_nca L_nca + w_centre L_centre + w_c L_contrast + w_d L_distill + w_q L_quant + w_b L_balance

``L_nca`` and ``L_centre`` use labels where they exist; ``L_contrast`` is learned from the images alone (two random
views of an image must be each other's nearest code among the batch), so an unlabelled archive can
train the model and labelled training keeps the visual neighbourhoods within a class that NCA alone
collapses. :func:`csq_loss` is the published baseline (Central Similarity Quantization, Yuan et al.,
CVPR 2020) trained on the same backbone in the same harness.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def relaxed_hamming(u: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """``d_ij = (K - u_i . v_j) / 2``: the Hamming distance when codes are exactly +/-1, smooth in between."""
    v = u if v is None else v
    return 0.5 * (u.shape[1] - u @ v.T)


def nca_loss(u: torch.Tensor, labels: torch.Tensor, scale: float = 8.0) -> torch.Tensor:
    """Multi-class neighbourhood component analysis loss on relaxed codes.

    With ``d_ij`` the relaxed Hamming distance (:func:`relaxed_hamming`) and ``s`` = ``scale``,
    each sample ``i`` picks a neighbour ``j != i`` with probability

        p_ij = exp(-s d_ij / K) / sum_{k != i} exp(-s d_ik / K)

    and the loss is the negative log-probability that it picks one of its own class::

        L_nca = -(1 / |A|) sum_{i in A} log sum_{j != i, y_j = y_i} p_ij

    where ``A`` are the samples with at least one same-class partner in the batch. It pulls codes of
    a class together only as much as needed to out-rank other classes (no fixed margin), and dividing
    by ``K`` keeps ``scale`` meaningful at every code length.
    """
    n, k = u.shape
    logits = -scale * relaxed_hamming(u) / k
    eye = torch.eye(n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(eye, float("-inf"))
    # unlabelled samples (-1) take part as neighbours but never as anyone's same class
    same = (labels[:, None] == labels[None, :]) & ~eye & (labels[:, None] >= 0)
    has_pos = same.any(dim=1)
    if not bool(has_pos.any()):
        return u.sum() * 0.0
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~same, float("-inf")), dim=1)
    return (log_all - log_pos)[has_pos].mean()


def quantization_loss(u: torch.Tensor) -> torch.Tensor:
    """``L_quant = 1/(N K) sum_ik (|u_ik| - 1)^2``: zero exactly when every relaxed bit is +/-1,
    so that taking the sign at inference changes the distances as little as possible."""
    return (u.abs() - 1.0).pow(2).mean()


def bit_balance_loss(u: torch.Tensor) -> torch.Tensor:
    """``L_balance = 1/K sum_k (1/N sum_i u_ik)^2``: zero when each bit is +1 on half the batch and
    -1 on the other half, so every bit splits the database and carries information."""
    return u.mean(dim=0).pow(2).mean()


def contrastive_loss(
    u: torch.Tensor, v: torch.Tensor, temperature: float = 0.2, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Contrast on relaxed codes (NT-Xent, Chen et al. 2020; several positives as in SupCon, Khosla
    et al. 2020), on the code geometry.

    ``u`` and ``v`` are two views of the same N images. With ``s_ij = cos(a_i, a_j)`` for the 2N
    relaxed codes ``a`` (1 - 2 d_ij / K once the codes are +/-1: a similarity in Hamming terms; the
    cosine keeps the temperature meaningful while the quantization term is still pulling the codes
    to +/-1), each code must pick its positives among the 2N - 1 others::

        L_contrast = -(1 / 2N) sum_i (1 / |P(i)|) sum_{p in P(i)} log( exp(s_ip / t) / sum_{j != i} exp(s_ij / t) )

    ``P(i)`` is the other view of the same image and, with ``groups`` (one id per image, e.g. its
    patient), both views of every other image of the same group: what stays the same for one
    patient across films (anatomy, habitus) must survive framing, exposure and noise, while every
    patient stays apart from the others, which keeps the codes from collapsing onto a few values.
    It needs no label, only what every archive records (MedAug, Vu et al. 2021, uses the same
    patient metadata for chest radiograph representations).
    """
    a = F.normalize(torch.cat([u, v], dim=0), dim=1)
    n2 = a.shape[0]
    n = n2 // 2
    eye = torch.eye(n2, dtype=torch.bool, device=a.device)
    logits = ((a @ a.T) / temperature).masked_fill(eye, float("-inf"))
    image = torch.arange(n, device=a.device).repeat(2)
    positive = image[:, None] == image[None, :]
    if groups is not None:
        g = groups.to(a.device).repeat(2)
        positive = positive | (g[:, None] == g[None, :])
    positive &= ~eye
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0).sum(dim=1)) / positive.sum(dim=1)
    return per_anchor.mean()


def neighbourhood_distillation(
    u: torch.Tensor, teacher: torch.Tensor, temperature: float = 0.2, teacher_temperature: float = 0.05
) -> torch.Tensor:
    """Distil a neighbourhood structure into the codes (relational knowledge distillation, Park et al.
    2019; as a softmax over the batch, Tian et al.'s CRD and SSKD use the same form).

    For each image of the batch the teacher's cosines to the others, sharpened by
    ``teacher_temperature``, give a distribution ``p_i`` over its neighbours; the relaxed codes' cosines
    give ``q_i``; the loss is the cross-entropy ``-(1/N) sum_i sum_{j != i} p_ij log q_ij`` (KL up to
    the teacher's entropy). It asks the codes to keep *who is whose neighbour*, not the teacher's
    distances, so 64 bits can follow a 128-dimensional teacher. The teacher here is the whitened
    layout (:class:`hashing.resnet.LayoutPath`): a structure computed from the images alone.
    """
    n = u.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=u.device)
    t = F.normalize(teacher.detach(), dim=1)
    p = ((t @ t.T) / teacher_temperature).masked_fill(eye, float("-inf")).softmax(dim=1)
    a = F.normalize(u, dim=1)
    log_q = ((a @ a.T) / temperature).masked_fill(eye, float("-inf")).log_softmax(dim=1)
    return -(p * log_q.masked_fill(eye, 0.0)).sum(dim=1).mean()


def centre_loss(u: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``L_centre = BCE((u+1)/2, (c_y+1)/2)`` over the labelled samples: CSQ's central similarity (Yuan et
    al. 2020) as one term of DRH's objective.

    NCA only asks a class to out-rank the others inside each batch, so classes stay close enough that
    the Hamming shortlist of a query mixes them; a fixed centre per class, K/2 bits from the others,
    separates them across the whole database. Zero labelled samples give zero.
    """
    known = labels >= 0
    if not bool(known.any()):
        return u.sum() * 0.0
    target = (centres[labels[known]] + 1) / 2
    prob = ((u[known] + 1) / 2).clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(prob, target)


def balanced_centres(num_classes: int, nbits: int, seed: int = 0) -> torch.Tensor:
    """Hash centres for DRH's centre term: :func:`csq_centers` without the all-ones Hadamard row, so that
    (below K classes) every centre is itself half +1 and half -1 and the bit-balance term does not pull
    against the class that would get the all-ones centre."""
    return csq_centers(num_classes + 1, nbits, seed)[1:]


def drh_loss(
    u: torch.Tensor,
    labels: torch.Tensor,
    *,
    v: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    teacher: torch.Tensor | None = None,
    centres: torch.Tensor | None = None,
    scale: float = 8.0,
    w_nca: float = 1.0,
    w_centre: float = 0.0,
    w_contrast: float = 0.0,
    w_distill: float = 0.0,
    temperature: float = 0.2,
    teacher_temperature: float = 0.05,
    w_quant: float = 0.1,
    w_balance: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DRH objective on relaxed codes ``u`` (and ``v``, a second view of the same images, for the
    contrast term, whose positives also join by ``groups``; ``teacher``, one row per row of ``u``, for
    the distillation term; ``centres``, one row per class, for the centre term); returns the total and its
    parts, for logging. NCA and the centre term see both views."""
    both = u if v is None else torch.cat([u, v], dim=0)
    both_labels = labels if v is None else torch.cat([labels, labels], dim=0)
    total = u.new_zeros(())
    parts: dict[str, float] = {}
    if w_nca > 0 and bool((both_labels >= 0).any()):
        nca = nca_loss(both, both_labels, scale)
        total = total + w_nca * nca
        parts["nca"] = float(nca.detach())
    if w_centre > 0 and centres is not None:
        cen = centre_loss(both, both_labels, centres)
        total = total + w_centre * cen
        parts["centre"] = float(cen.detach())
    if w_contrast > 0 and v is not None:
        con = contrastive_loss(u, v, temperature, groups)
        total = total + w_contrast * con
        parts["contrast"] = float(con.detach())
    if w_distill > 0 and teacher is not None:
        dis = neighbourhood_distillation(u, teacher, temperature, teacher_temperature)
        total = total + w_distill * dis
        parts["distill"] = float(dis.detach())
    q = quantization_loss(both)
    b = bit_balance_loss(both)
    total = total + w_quant * q + w_balance * b
    parts.update(quant=float(q.detach()), balance=float(b.detach()))
    return total, parts


# -- CSQ (baseline) -------------------------------------------------------------------------------


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order ``n`` (a power of two), entries +/-1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def csq_centers(num_classes: int, nbits: int, seed: int = 0) -> torch.Tensor:
    """Hash centers as in CSQ: rows of a Hadamard matrix and their negations (pairwise distance K/2
    or K) when ``2K >= C`` and K is a power of two; otherwise random Bernoulli centers (seeded)."""
    if nbits & (nbits - 1) == 0 and num_classes <= 2 * nbits:
        h = hadamard(nbits)
        return torch.cat([h, -h], 0)[:num_classes]
    gen = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(num_classes, nbits, generator=gen) < 0.5, -1.0, 1.0)


def csq_loss(
    u: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, *, w_quant: float = 1e-4
) -> tuple[torch.Tensor, dict[str, float]]:
    """CSQ: ``L = BCE((u+1)/2, (c_y+1)/2) + w_quant * mean (|u| - 1)^2``, ``c_y`` the class's hash center
    (the published objective with the authors' default weight)."""
    center = centre_loss(u, labels, centers)
    q = quantization_loss(u)
    return center + w_quant * q, {"center": float(center.detach()), "quant": float(q.detach())}


def instance_arm_weight(epoch: float, epochs: int, start: float = 1.0) -> float:
    """DMIH's instance-level arm weight: ``start * cos^2(pi/2 * t / T)``, from ``start`` to 0 at the end."""
    t = min(max(epoch / max(epochs, 1), 0.0), 1.0)
    return start * math.cos(0.5 * math.pi * t) ** 2
