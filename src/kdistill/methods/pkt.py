"""PKT (probabilistic knowledge transfer): CE + β·pkt_loss on pooled vectors (Passalis & Tefas, ECCV 2018);
docs/methods/pkt.md."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kdistill.losses import pkt_loss
from kdistill.methods.base import register_method
from kdistill.methods.feature_loss import FeatureLossMethod, FeatureLossOptions


@dataclass
class PKTOptions(FeatureLossOptions):
    """β=30000 (the benchmark's)."""

    feat_weight: float = 30000.0


@register_method
class PKT(FeatureLossMethod):
    """Pooled penultimate vectors (``feat[-1]``); β=30000."""

    name = "pkt"
    Options = PKTOptions
    options: PKTOptions
    pairs = "pooled"

    def feature_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return pkt_loss(student, teacher)
