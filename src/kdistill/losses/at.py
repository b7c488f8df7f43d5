"""Attention transfer (Zagoruyko & Komodakis, arXiv 1612.03928), docs/methods/at.md."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import check_batch, float32_loss, pool_to_common_size, upcast


def attention_map(feature: Tensor, p: float = 2) -> Tensor:
    """a(F) = normalise(vec(mean_c F_c^p)) ∈ R^{B×HW}, L2-normalised per sample (AT paper eq. 2)."""
    return F.normalize(feature.pow(p).mean(dim=1).flatten(1), dim=1)


@float32_loss
def at_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2) -> Tensor:
    """mean_{b,k} (a(F_s) − a(F_t))²  for one stage (the benchmark's variant of AT paper eq. 2).

    Maps of different sizes are average-pooled to (min H, min W) first; channel counts may differ.
    This is the mean of squared differences over B·HW entries, as in the CIFAR benchmark code, not
    the norm of the paper. ``teacher_feature`` receives no gradient.
    """
    check_batch("at_loss", student_feature, teacher_feature)
    s, t = pool_to_common_size(upcast(student_feature), upcast(teacher_feature.detach()))
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
