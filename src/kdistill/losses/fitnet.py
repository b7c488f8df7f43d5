"""FitNets hint loss (Romero et al., arXiv 1412.6550), docs/methods/fitnet.md."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import float32_loss, upcast


@float32_loss
def fitnet_loss(regressed_student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """MSE(r(F_s), F_t), the mean over all elements (FitNets eq. 3 up to the factor ½).

    ``regressed_student_feature`` is the student hint already mapped to the teacher's shape by a
    regressor (``kdistill.methods.fitnet.ConvReg``). ``teacher_feature`` receives no gradient.
    """
    if regressed_student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"fitnet_loss: regressed student shape {tuple(regressed_student_feature.shape)} must equal "
            f"the teacher hint shape {tuple(teacher_feature.shape)}"
        )
    return F.mse_loss(upcast(regressed_student_feature), upcast(teacher_feature.detach()))
