"""Relational knowledge distillation (Park et al., CVPR 2019, arXiv 1904.05068); docs/methods/rkd.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import check_batch, float32_loss, upcast

_EPS = 1e-12


def _pairwise_distances(e: Tensor) -> Tensor:
    """d_ij = sqrt(max(‖e_i‖² + ‖e_j‖² − 2 e_i·e_j, 1e-12)), zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=_EPS).sqrt()
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _distance_potential(e: Tensor) -> Tensor:
    """ψ_D = d / μ, μ = mean of the strictly positive distances (RKD paper eq. 4)."""
    d = _pairwise_distances(e)
    return d / d[d > 0].mean()


def _angle_potential(e: Tensor) -> Tensor:
    """ψ_A(i,j,k) = ⟨normalise(e_j − e_i), normalise(e_k − e_i)⟩ over all B³ triples (eq. 6).

    Memory is O(B³·1) for the result and O(B²·D) for the differences.
    """
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


@float32_loss
def rkd_loss(
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """distance_weight·SmoothL1(ψ_D^s, ψ_D^t) + angle_weight·SmoothL1(ψ_A^s, ψ_A^t) (RKD eqs. 5, 7).

    Huber with δ = 1, averaged over the B² distance and B³ angle entries. Both potentials are
    invariant to scaling and translation of an embedding; widths may differ.
    ``teacher_embedding`` receives no gradient.
    """
    check_batch("rkd_loss", student_embedding, teacher_embedding)
    s = upcast(student_embedding).flatten(1)
    with torch.no_grad():
        t = upcast(teacher_embedding.detach()).flatten(1)
        t_dist, t_angle = _distance_potential(t), _angle_potential(t)
    loss = s.new_zeros(())
    if distance_weight:
        loss = loss + distance_weight * F.smooth_l1_loss(_distance_potential(s), t_dist)
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angle_potential(s), t_angle)
    return loss
