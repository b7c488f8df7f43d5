"""Neuron selectivity transfer (Huang & Wang, arXiv 1707.01219); docs/methods/nst.md."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import check_batch, float32_loss, pool_to_common_size, upcast


def _mean_poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """mean over the batch and all channel pairs (i, j) of (a_i · b_j)², a: B×C_a×N, b: B×C_b×N."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


@float32_loss
def nst_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Squared MMD with the polynomial kernel k(x, y) = (x·y)² (NST paper eq. 6, d = 2, c = 0).

    Maps are pooled to (min H, min W), reshaped to B×C×HW and each channel's spatial vector is
    L2-normalised; then  mean k(t,t) + mean k(s,s) − 2·mean k(s,t)  (the teacher–teacher term is a
    constant). Channel counts may differ. ``teacher_feature`` receives no gradient.
    """
    check_batch("nst_loss", student_feature, teacher_feature)
    s, t = pool_to_common_size(upcast(student_feature), upcast(teacher_feature.detach()))
    s = F.normalize(s.flatten(2), dim=2)
    t = F.normalize(t.flatten(2), dim=2)
    return _mean_poly_kernel(t, t) + _mean_poly_kernel(s, s) - 2 * _mean_poly_kernel(s, t)
