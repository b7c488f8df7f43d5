"""Similarity-preserving KD (Tung & Mori, ICCV 2019, arXiv 1907.09682), docs/methods/sp.md."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import check_batch, float32_loss, upcast


def similarity_matrix(feature: Tensor) -> Tensor:
    """G̃ = row-normalise(F Fᵀ) with F the features flattened to B×D (SP paper eqs. 2–3)."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


@float32_loss
def sp_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """(1/B²) ‖G̃_t − G̃_s‖²_F (SP paper eq. 4) on any per-sample features (maps or vectors).

    Student and teacher widths may differ; only the batch size must match.
    ``teacher_feature`` receives no gradient.
    """
    check_batch("sp_loss", student_feature, teacher_feature)
    batch = student_feature.shape[0]
    diff = similarity_matrix(upcast(teacher_feature.detach())) - similarity_matrix(upcast(student_feature))
    return diff.pow(2).sum() / batch**2
