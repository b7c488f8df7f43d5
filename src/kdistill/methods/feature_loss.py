"""The shape that AT, NST, SP and PKT share: γ·CE + β·Σ_pairs loss(student feature, teacher feature), one
teacher, the pairs chosen by feature key. Each method names its pairs and its loss; docs/methods/<name>.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.methods.base import Batch, Method, MethodOptions, ModelOutput, StepInfo, check_weight


@dataclass
class FeatureLossOptions(MethodOptions):
    """γ (``ce_weight``) and β (``feat_weight``); each method sets its own β default."""

    ce_weight: float = 1.0
    feat_weight: float = 1.0

    def check(self) -> None:
        check_weight("ce_weight", self.ce_weight)
        check_weight("feat_weight", self.feat_weight)


class FeatureLossMethod(Method):
    """CE plus β times the sum of ``feature_loss`` over the paired features of one teacher.

    ``pairs`` picks the features: ``"stages"`` every stage, shallow to deep (their counts must match),
    ``"last_stage"`` the last stage of each network, ``"pooled"`` the pooled penultimate vectors.
    """

    pairs: ClassVar[str] = "stages"
    options: FeatureLossOptions

    def feature_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The method's loss between one student feature and its teacher feature."""
        raise NotImplementedError

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        self.ce_weight = float(self.options.ce_weight)
        self.feat_weight = float(self.options.feat_weight)
        if self.pairs == "stages":
            self.pair_all_stages()
        elif self.pairs == "last_stage":
            self.student_features = student.stages()[-1:]
            self.teacher_features = teachers[0].stages()[-1:]
        elif self.pairs == "pooled":
            self.student_features = ["pooled"]
            self.teacher_features = ["pooled"]
        else:
            raise ValueError(f"{type(self).__name__}.pairs must be 'stages', 'last_stage' or 'pooled', not {self.pairs!r}")

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        s_feats, t_feats = student.features, teachers[0].features
        loss = sum(
            self.feature_loss(s_feats[s], t_feats[t])
            for s, t in zip(self.student_features, self.teacher_features, strict=True)
        )
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            self.name: self.feat_weight * loss,
        }
