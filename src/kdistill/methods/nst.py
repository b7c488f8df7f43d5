"""NST (neuron selectivity transfer): CE + β·Σ_stages nst_loss, baselines spec §2.10."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses import nst_loss
from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo, check_weight, register_method


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
        self.pair_all_stages(student, teachers[0])

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
