"""RKD (relational KD): CE + β·(25·distance + 50·angle) on pooled vectors (Park et al., CVPR 2019);
docs/methods/rkd.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import rkd_loss
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
class RKDOptions(MethodOptions):
    """β=1, distance weight 25, angle weight 50 (the benchmark's)."""

    ce_weight: float = 1.0
    feat_weight: float = 1.0
    distance_weight: float = 25.0
    angle_weight: float = 50.0

    def check(self) -> None:
        for name in ("ce_weight", "feat_weight", "distance_weight", "angle_weight"):
            check_weight(name, getattr(self, name))


@register_method
class RKD(Method):
    """Pooled penultimate vectors (``feat[-1]``); β=1, distance weight 25, angle weight 50.

    The angle term costs O(B³) memory (B=64: 262k triples, fine).
    """

    name = "rkd"
    Options = RKDOptions
    options: RKDOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        o = self.options
        self.ce_weight = float(o.ce_weight)
        self.feat_weight = float(o.feat_weight)
        self.distance_weight = float(o.distance_weight)
        self.angle_weight = float(o.angle_weight)
        self.student_features = ["pooled"]
        self.teacher_features = ["pooled"]

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        loss = rkd_loss(
            student.features["pooled"], teachers[0].features["pooled"], self.distance_weight, self.angle_weight
        )
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "rkd": self.feat_weight * loss,
        }
