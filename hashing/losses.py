"""Losses for deep hashing on relaxed codes ``u`` in (-1, 1)^K (``tanh`` of the hash layer).

DRH's objective is ``L = L_nca + w_q * L_quant + w_b * L_balance`` (weights configurable in
:mod:`hashing.train`). :func:`csq_loss` is the published baseline (Central Similarity Quantization,
Yuan et al., CVPR 2020) trained on the same backbone in the same harness.
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
    same = (labels[:, None] == labels[None, :]) & ~eye
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


def drh_loss(
    u: torch.Tensor, labels: torch.Tensor, *, scale: float = 8.0, w_quant: float = 0.1, w_balance: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """``L = L_nca + w_quant L_quant + w_balance L_balance``; also the parts, for logging."""
    nca = nca_loss(u, labels, scale)
    q = quantization_loss(u)
    b = bit_balance_loss(u)
    total = nca + w_quant * q + w_balance * b
    return total, {"nca": float(nca.detach()), "quant": float(q.detach()), "balance": float(b.detach())}


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
    target = (centers[labels] + 1) / 2
    prob = ((u + 1) / 2).clamp(1e-6, 1 - 1e-6)
    center = F.binary_cross_entropy(prob, target)
    q = quantization_loss(u)
    return center + w_quant * q, {"center": float(center.detach()), "quant": float(q.detach())}


def instance_arm_weight(epoch: float, epochs: int, start: float = 1.0) -> float:
    """DMIH's instance-level arm weight: ``start * cos^2(pi/2 * t / T)``, from ``start`` to 0 at the end."""
    t = min(max(epoch / max(epochs, 1), 0.0), 1.0)
    return start * math.cos(0.5 * math.pi * t) ** 2
