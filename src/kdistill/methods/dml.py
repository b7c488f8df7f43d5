"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018): peers teach each other.

Each of K networks of the cohort (``online.peers``, any architectures) minimises its cross-entropy
plus the mean KL divergence from the other networks' detached predictions to its own. Every
network has its own optimizer; one backward pass gives each exactly its objective's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import mutual_kl
from kdistill.methods._cohort import member_groups, require_cohort
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
from kdistill.optim import ParamGroup


@dataclass
class DMLOptions(MethodOptions):
    """``temperature`` of the mimicry KL (1 in the paper), weights of the two terms."""

    temperature: float = 1.0
    ce_weight: float = 1.0
    kl_weight: float = 1.0

    def check(self) -> None:
        check_positive("temperature", self.temperature)
        check_weight("ce_weight", self.ce_weight)
        check_weight("kl_weight", self.kl_weight)


@register_method
class DML(Method):
    """``Σ_k CE(z_k, y) + 1/(K-1) Σ_{l≠k} KL_T(sg z_l ‖ z_k)`` over the cohort's networks."""

    name = "dml"
    Options = DMLOptions
    needs_teacher = False
    options: DMLOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.cohort = [require_cohort(self.name, student)]  # a list: not registered as a submodule
        self.student_features = [f"{n}/logits" for n in self.cohort[0].names]

    def select_teachers(self, info: StepInfo) -> list[int]:
        return []

    def param_groups(self) -> list[ParamGroup]:
        return member_groups(self.cohort[0])

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        o = self.options
        logits = [student.features[k] for k in self.student_features]
        return {
            "ce": o.ce_weight * sum(F.cross_entropy(z, batch.targets) for z in logits),
            "mutual": o.kl_weight * mutual_kl(logits, o.temperature).sum(),
        }
