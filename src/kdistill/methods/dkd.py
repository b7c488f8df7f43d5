"""DKD (Zhao et al., CVPR 2022): CE + warm-up · (α·TCKD + β·NCKD); docs/methods/dkd.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import dkd_loss
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
class DKDOptions(MethodOptions):
    """Defaults are mdistiller's: CE weight 1, α 1, β 8, T 4, warm-up 20 epochs.

    The per-pair CIFAR-100 β (2 for resnet56/110 pairs, 6 for WRN/VGG pairs) is set in the recipes.
    """

    ce_weight: float = 1.0
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup_epochs: int = 20
    EPOCH_DEFAULTS: ClassVar[dict[str, int]] = {"warmup_epochs": 240}  # CIFAR's 240-epoch schedule

    def check(self) -> None:
        check_weight("ce_weight", self.ce_weight)
        check_weight("alpha", self.alpha)
        check_weight("beta", self.beta)
        check_positive("temperature", self.temperature)
        if not (isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0):
            raise ConfigError(f"warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")


@register_method
class DKD(Method):
    """Target-class and non-target-class KD terms, the pair ramped up over ``warmup_epochs``."""

    name = "dkd"
    Options = DKDOptions
    options: DKDOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        o = self.options
        self.ce_weight = float(o.ce_weight)
        self.alpha = float(o.alpha)
        self.beta = float(o.beta)
        self.temperature = float(o.temperature)
        self.warmup_epochs = o.warmup_epochs

    def warmup_factor(self, info: StepInfo) -> float:
        """min(e / warmup, 1) with the 1-indexed epoch e = ``info.epoch + 1`` (mdistiller convention)."""
        if self.warmup_epochs == 0:
            return 1.0
        return min((info.epoch + 1) / self.warmup_epochs, 1.0)

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        dkd = dkd_loss(student.logits, teachers[0].logits, batch.targets, self.alpha, self.beta, self.temperature)
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "dkd": self.warmup_factor(info) * dkd,
        }
