"""Variational Information Distillation (Ahn et al., arXiv 1904.05835); docs/methods/vid.md.

For one stage: a regressor predicts the teacher map's mean from the student map, and a per-channel
Gaussian variance ``σ_c² = softplus(α_c) + ε`` turns the error into a negative log-likelihood
``mean ½[(μ - F_t)²/σ_c² + log σ_c²]``. The variances start at ``init_var`` (5.0).

mdistiller keeps ``α`` in a plain list, so it is never trained, saved or moved
(variance fixed at 5.0); RepDistiller trains it. Here ``α`` is always registered: a parameter
with ``learn_variance=True`` (RepDistiller), a buffer with ``learn_variance=False`` (mdistiller's
values), saved in checkpoints either way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses._common import pool_to_common_size


class VIDLoss(nn.Module):
    """VID loss of one stage: student map B×C_s×H×W, teacher map B×C_t×H'×W'.

    Regressor (no bias, no BN, hidden width ``C_t``): 1×1 conv C_s→C_t, ReLU, 1×1 conv, ReLU,
    1×1 conv. ``variance`` gives ``σ²`` (C_t values).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        init_var: float = 5.0,
        eps: float = 1e-5,
        learn_variance: bool = True,
    ):
        super().__init__()
        if not init_var > eps:
            raise ValueError(f"init_var must be > eps ({eps}), got {init_var}")
        c_s, c_t = student_channels, teacher_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(c_t, c_t, 1, bias=False),
        )
        self.eps = float(eps)
        # inverse softplus, so that softplus(alpha) + eps == init_var
        alpha = torch.full((c_t,), math.log(math.expm1(init_var - eps)))
        if learn_variance:
            self.alpha = nn.Parameter(alpha)
        else:
            self.register_buffer("alpha", alpha)

    @property
    def variance(self) -> Tensor:
        """Per-channel predicted variance ``softplus(α) + ε``."""
        return F.softplus(self.alpha) + self.eps

    def forward(self, feat_student: Tensor, feat_teacher: Tensor) -> Tensor:
        student, teacher = pool_to_common_size(feat_student, feat_teacher.detach())
        mean = self.regressor(student)
        var = self.variance.view(1, -1, 1, 1)
        nll = 0.5 * ((mean.float() - teacher.float()) ** 2 / var + torch.log(var))
        return nll.mean()
