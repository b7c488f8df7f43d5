"""KD (Hinton et al., arXiv 1503.02531): γ·CE + α·T²·KL, baselines spec §2.1.

With several teachers the target is the mean of the teachers' temperature-softened probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses import kd_loss
from kdistill.methods.base import Batch, Method, ModelOutput, StepInfo, check_weight, register_method
from kdistill.utils import ConfigError


@register_method
class KD(Method):
    """Defaults are the CIFAR-100 benchmark's: T=4, CE weight 0.1, KD weight 0.9."""

    name = "kd"

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        *,
        temperature: float = 4.0,
        ce_weight: float = 0.1,
        kd_weight: float = 0.9,
        **common,
    ):
        super().__init__(student, teachers, **common)
        if not teachers:
            raise ConfigError("kd needs at least one teacher")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.ce_weight = check_weight("ce_weight", ce_weight)
        self.kd_weight = check_weight("kd_weight", kd_weight)

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
