"""Plain training: cross-entropy on the labels (the "student alone" row of every table)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
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
class CEOptions(MethodOptions):
    """Weight of the cross-entropy and its label smoothing."""

    ce_weight: float = 1.0
    label_smoothing: float = 0.0

    def check(self) -> None:
        check_weight("ce_weight", self.ce_weight)
        if not 0 <= self.label_smoothing < 1:  # also false for NaN
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@register_method
class CE(Method):
    """Cross-entropy with optional label smoothing; needs no teacher."""

    name = "ce"
    Options = CEOptions
    needs_teacher = False
    options: CEOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.ce_weight = float(self.options.ce_weight)
        self.label_smoothing = self.options.label_smoothing

    def select_teachers(self, info: StepInfo) -> list[int]:
        return []

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        ce = F.cross_entropy(student.logits, batch.targets, label_smoothing=self.label_smoothing)
        return {"ce": self.ce_weight * ce}
