"""PKT (probabilistic knowledge transfer): CE + β·pkt_loss on pooled vectors, baselines spec §2.6."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses import pkt_loss
from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo, check_weight, register_method


@register_method
class PKT(Method):
    """Pooled penultimate vectors (``feat[-1]``); β=30000."""

    name = "pkt"
    uses_teacher_logits = False

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        *,
        ce_weight: float = 1.0,
        feat_weight: float = 30000.0,
        **common,
    ):
        super().__init__(student, teachers, **common)
        self.require_one_teacher(teachers)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.feat_weight = check_weight("feat_weight", feat_weight)
        self.student_features = ["pooled"]
        self.teacher_features = ["pooled"]

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        loss = pkt_loss(student.features["pooled"], teachers[0].features["pooled"])
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "pkt": self.feat_weight * loss,
        }
