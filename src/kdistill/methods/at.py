"""AT (attention transfer): CE + β·Σ_stages at_loss (Zagoruyko & Komodakis, ICLR 2017);
docs/methods/at.md."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdistill.losses import at_loss
from kdistill.methods.base import check_positive, register_method
from kdistill.methods.feature_loss import FeatureLossMethod, FeatureLossOptions


@dataclass
class ATOptions(FeatureLossOptions):
    """β=1000, p=2 (the benchmark's)."""

    feat_weight: float = 1000.0
    p: float = 2.0

    def check(self) -> None:
        check_positive("p", self.p)
        super().check()


@register_method
class AT(FeatureLossMethod):
    """All post-ReLU stage outputs (``feat[1:-1]``), paired shallow to deep; β=1000, p=2."""

    name = "at"
    Options = ATOptions
    options: ATOptions
    pairs = "stages"

    def feature_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return at_loss(student, teacher, float(self.options.p))
