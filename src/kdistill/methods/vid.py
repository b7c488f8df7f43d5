"""VID (Ahn et al., arXiv 1904.05835): γ·CE + β·Σ_stages VID; docs/methods/vid.md.

Uses every stage output (post-ReLU, ``feat[1:-1]``) of student and teacher, paired in order; one
``VIDLoss`` (regressor + per-channel variances) per stage, sized by probing the two models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.features import TappedModel
from kdistill.losses import VIDLoss
from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    StepInfo,
    check_weight,
    register_method,
)
from kdistill.utils import ConfigError


@dataclass
class VIDOptions(MethodOptions):
    """Defaults are the CIFAR-100 benchmark's: γ=1, β=1, initial variance 5.0, ε=1e-5.

    ``learn_variance=True`` trains the variances (RepDistiller); ``False`` keeps them at
    ``init_var`` (mdistiller, whose variances are never registered).
    """

    ce_weight: float = 1.0
    vid_weight: float = 1.0
    init_var: float = 5.0
    eps: float = 1e-5
    learn_variance: bool = True

    def check(self) -> None:
        if not self.eps > 0 or not self.init_var > self.eps:
            raise ConfigError(f"vid: need init_var > eps > 0, got init_var={self.init_var}, eps={self.eps}")
        check_weight("ce_weight", self.ce_weight)
        check_weight("vid_weight", self.vid_weight)


@register_method
class VID(Method):
    """One variational regressor per stage pair, sized by probing both networks."""

    name = "vid"
    Options = VIDOptions
    options: VIDOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        o = self.options
        self.ce_weight = float(o.ce_weight)
        self.vid_weight = float(o.vid_weight)
        s_keys = student.stages()
        t_keys = teachers[0].stages()
        if not s_keys or len(s_keys) != len(t_keys):
            raise ConfigError(
                f"vid pairs stages in order; student stages {s_keys} and teacher stages {t_keys} do not match"
            )
        self.student_features = s_keys
        self.teacher_features = t_keys
        s_shapes = self.probe(student, s_keys)
        t_shapes = self.probe(teachers[0], t_keys)
        self.stages = nn.ModuleList(
            VIDLoss(s_shapes[s][0], t_shapes[t][0], o.init_var, o.eps, o.learn_variance)
            for s, t in zip(s_keys, t_keys, strict=True)
        )

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        teacher = teachers[0]
        vid = sum(
            loss(student.features[s], teacher.features[t])
            for loss, s, t in zip(self.stages, self.student_features, self.teacher_features, strict=True)
        )
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "vid": self.vid_weight * vid,
        }
