"""PKT (probabilistic knowledge transfer): CE + β·pkt_loss on pooled vectors (Passalis & Tefas, ECCV 2018);
docs/methods/pkt.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import pkt_loss
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
class PKTOptions(MethodOptions):
    """β=30000 (the benchmark's)."""

    ce_weight: float = 1.0
    feat_weight: float = 30000.0

    def check(self) -> None:
        check_weight("ce_weight", self.ce_weight)
        check_weight("feat_weight", self.feat_weight)


@register_method
class PKT(Method):
    """Pooled penultimate vectors (``feat[-1]``); β=30000."""

    name = "pkt"
    Options = PKTOptions
    options: PKTOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        self.ce_weight = float(self.options.ce_weight)
        self.feat_weight = float(self.options.feat_weight)
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
