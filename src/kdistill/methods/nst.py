"""NST (neuron selectivity transfer): CE + β·Σ_stages nst_loss, baselines spec §2.10."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses import nst_loss
from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo, check_weight, register_method
from kdistill.utils import ConfigError


@register_method
class NST(Method):
    """All post-ReLU stage outputs (``feat[1:-1]``), paired shallow to deep; β=50."""

    name = "nst"
    uses_teacher_logits = False

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        *,
        ce_weight: float = 1.0,
        feat_weight: float = 50.0,
        **common,
    ):
        super().__init__(student, teachers, **common)
        self.require_one_teacher(teachers)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.feat_weight = check_weight("feat_weight", feat_weight)
        self.student_features = self.available_stages(student, teacher=False)
        self.teacher_features = self.available_stages(teachers[0], teacher=True)
        if not self.student_features or len(self.student_features) != len(self.teacher_features):
            raise ConfigError(
                f"nst pairs stages one to one, but the student has {self.student_features} and the teacher "
                f"{self.teacher_features}; give matching student_taps/teacher_taps"
            )

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        s_feats, t_feats = student.features, teachers[0].features
        loss = sum(
            nst_loss(s_feats[s], t_feats[t]) for s, t in zip(self.student_features, self.teacher_features, strict=True)
        )
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "nst": self.feat_weight * loss,
        }
