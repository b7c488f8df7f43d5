"""SP (similarity-preserving KD): CE + β·sp_loss on the last stage, baselines spec §2.4."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses import sp_loss
from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo, check_weight, register_method


@register_method
class SP(Method):
    """Last post-ReLU stage output of each model (``feat[-2]``); β=3000."""

    name = "sp"
    uses_teacher_logits = False

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        *,
        ce_weight: float = 1.0,
        feat_weight: float = 3000.0,
        **common,
    ):
        super().__init__(student, teachers, **common)
        self.require_one_teacher(teachers)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.feat_weight = check_weight("feat_weight", feat_weight)
        self.student_features = self.available_stages(student, teacher=False)[-1:]
        self.teacher_features = self.available_stages(teachers[0], teacher=True)[-1:]

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        loss = sp_loss(student.features[self.student_features[0]], teachers[0].features[self.teacher_features[0]])
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "sp": self.feat_weight * loss,
        }
