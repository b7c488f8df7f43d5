"""Plain training: cross-entropy on the labels (the "student alone" row of every table)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo, check_weight, register_method


@register_method
class CE(Method):
    """Cross-entropy with optional label smoothing; needs no teacher."""

    name = "ce"
    uses_teacher_logits = False

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        *,
        ce_weight: float = 1.0,
        label_smoothing: float = 0.0,
        **common,
    ):
        super().__init__(student, teachers, **common)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.label_smoothing = label_smoothing

    def select_teachers(self, info: StepInfo) -> list[int]:
        return []

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        ce = F.cross_entropy(student.logits, batch.targets, label_smoothing=self.label_smoothing)
        return {"ce": self.ce_weight * ce}
