"""AT (attention transfer): CE + β·Σ_stages at_loss (Zagoruyko & Komodakis, ICLR 2017);
docs/methods/at.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import at_loss
from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    StepInfo,
    check_positive,
    check_weight,
    register_method,
)


@dataclass
class ATOptions(MethodOptions):
    """β=1000, p=2 (the benchmark's)."""

    ce_weight: float = 1.0
    feat_weight: float = 1000.0
    p: float = 2.0

    def check(self) -> None:
        check_positive("p", self.p)
        check_weight("ce_weight", self.ce_weight)
        check_weight("feat_weight", self.feat_weight)


@register_method
class AT(Method):
    """All post-ReLU stage outputs (``feat[1:-1]``), paired shallow to deep; β=1000, p=2."""

    name = "at"
    Options = ATOptions
    options: ATOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        self.ce_weight = float(self.options.ce_weight)
        self.feat_weight = float(self.options.feat_weight)
        self.p = float(self.options.p)
        self.pair_all_stages()

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
