"""AT (attention transfer): CE + β·Σ_stages at_loss, baselines spec §2.3."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses import at_loss
from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo, check_weight, register_method
from kdistill.utils import ConfigError


@register_method
class AT(Method):
    """All post-ReLU stage outputs (``feat[1:-1]``), paired shallow to deep; β=1000, p=2."""

    name = "at"
    uses_teacher_logits = False

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        *,
        ce_weight: float = 1.0,
        feat_weight: float = 1000.0,
        p: float = 2.0,
        **common,
    ):
        super().__init__(student, teachers, **common)
        self.require_one_teacher(teachers)
        if not p > 0:
            raise ConfigError(f"p must be > 0, got {p}")
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.feat_weight = check_weight("feat_weight", feat_weight)
        self.p = float(p)
        self.pair_all_stages(student, teachers[0])

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        s_feats, t_feats = student.features, teachers[0].features
        loss = sum(
            at_loss(s_feats[s], t_feats[t], self.p)
            for s, t in zip(self.student_features, self.teacher_features, strict=True)
        )
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "at": self.feat_weight * loss,
        }
