"""KD (Hinton et al., arXiv 1503.02531): γ·CE + α·T²·KL; docs/methods/kd.md.

With several teachers the target is the mean of the teachers' temperature-softened probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import kd_loss
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
from kdistill.utils import ConfigError


@dataclass
class KDOptions(MethodOptions):
    """Defaults are the CIFAR-100 benchmark's: T=4, CE weight 0.1, KD weight 0.9."""

    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9

    def check(self) -> None:
        check_positive("temperature", self.temperature)
        check_weight("ce_weight", self.ce_weight)
        check_weight("kd_weight", self.kd_weight)


@register_method
class KD(Method):
    """Softened teacher probabilities as targets (several teachers: their mean)."""

    name = "kd"
    Options = KDOptions
    options: KDOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        if not teachers:
            raise ConfigError("kd needs at least one teacher")
        self.temperature = float(self.options.temperature)
        self.ce_weight = float(self.options.ce_weight)
        self.kd_weight = float(self.options.kd_weight)

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        if len(teachers) == 1:
            teacher_logits = teachers[0].logits
        else:
            # log of the mean of softened probabilities, rescaled so kd_loss's /T recovers it
            probs = torch.stack([F.softmax(t.logits.float() / self.temperature, 1) for t in teachers]).mean(0)
            teacher_logits = probs.log() * self.temperature
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "kd": self.kd_weight * kd_loss(student.logits, teacher_logits, self.temperature),
        }
