"""SP (similarity-preserving KD): CE + β·sp_loss on the last stage (Tung & Mori, ICCV 2019); docs/methods/sp.md."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdistill.losses import sp_loss
from kdistill.methods.base import register_method
from kdistill.methods.feature_loss import FeatureLossMethod, FeatureLossOptions


@dataclass
class SPOptions(FeatureLossOptions):
    """β=3000 (the benchmark's)."""

    feat_weight: float = 3000.0


@register_method
class SP(FeatureLossMethod):
    """Last post-ReLU stage output of each model (``feat[-2]``); β=3000."""

    name = "sp"
    Options = SPOptions
    options: SPOptions
    pairs = "last_stage"

    def feature_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return sp_loss(student, teacher)
