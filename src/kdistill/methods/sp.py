"""SP (similarity-preserving KD): CE + β·sp_loss on the last stage (Tung & Mori, ICCV 2019); docs/methods/sp.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import sp_loss
from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    StepInfo,
    check_weight,
    register_method,
)


@dataclass
class SPOptions(MethodOptions):
    """β=3000 (the benchmark's)."""

    ce_weight: float = 1.0
    feat_weight: float = 3000.0

    def check(self) -> None:
        check_weight("ce_weight", self.ce_weight)
        check_weight("feat_weight", self.feat_weight)


@register_method
class SP(Method):
    """Last post-ReLU stage output of each model (``feat[-2]``); β=3000."""

    name = "sp"
    Options = SPOptions
    options: SPOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        self.ce_weight = float(self.options.ce_weight)
        self.feat_weight = float(self.options.feat_weight)
        self.student_features = student.stages()[-1:]
        self.teacher_features = teachers[0].stages()[-1:]

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        loss = sp_loss(student.features[self.student_features[0]], teachers[0].features[self.teacher_features[0]])
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "sp": self.feat_weight * loss,
        }
