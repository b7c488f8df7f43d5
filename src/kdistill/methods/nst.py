"""NST (neuron selectivity transfer): CE + β·Σ_stages nst_loss (Huang & Wang, 2017); docs/methods/nst.md."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdistill.losses import nst_loss
from kdistill.methods.base import register_method
from kdistill.methods.feature_loss import FeatureLossMethod, FeatureLossOptions


@dataclass
class NSTOptions(FeatureLossOptions):
    """β=50 (the benchmark's)."""

    feat_weight: float = 50.0


@register_method
class NST(FeatureLossMethod):
    """All post-ReLU stage outputs (``feat[1:-1]``), paired shallow to deep; β=50."""

    name = "nst"
    Options = NSTOptions
    options: NSTOptions
    pairs = "stages"

    def feature_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return nst_loss(student, teacher)
