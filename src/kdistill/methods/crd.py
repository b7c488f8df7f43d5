"""CRD and CRD+KD (Tian et al., arXiv 1910.10699): γ·CE + α·KD + β·CRD; docs/methods/crd.md.

``crd_kd`` (α=1, T=4) is ``crd`` (α=0) with another default ``kd_weight``: a subclass of its options.
The embedding heads are sized from the pooled widths of the two models (mdistiller needs them set per pair).

``num_samples`` is the training-set size: the memory bank has one row per sample and
``batch.index`` must hold dataset row indices in ``[0, num_samples)``. The kdistill engine passes
``len(train set)`` as ``RunFacts.num_samples`` and its data loader yields the indices; in your own
loop, pass ``num_samples`` (an option) or ``facts`` and the indices yourself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import CRDLoss, kd_loss
from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    StepInfo,
    check_bank_options,
    check_weight,
    register_method,
)
from kdistill.utils import ConfigError


@dataclass
class CRDOptions(MethodOptions):
    """CRD on the pooled vectors; defaults are the CIFAR-100 benchmark's (RepDistiller, mdistiller).

    Options: ``num_samples`` (training-set size; default: the run's, ``RunFacts.num_samples``),
    ``num_negatives`` K (16384, clipped to ``num_samples - 1`` with a warning), ``temperature`` τ
    (0.07), ``momentum`` of the memory update (0.5), ``feat_dim`` (128), ``sampling`` (``"fast"``:
    on-device, with replacement; ``"exact"``: without replacement as the reference), ``ce_weight``
    γ (1), ``crd_weight`` β (0.8), ``kd_weight`` α (0 here, 1 for ``crd_kd``) and ``kd_temperature`` (4).
    """

    num_samples: int | None = None
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.5
    feat_dim: int = 128
    sampling: str = "fast"
    ce_weight: float = 1.0
    crd_weight: float = 0.8
    kd_weight: float = 0.0
    kd_temperature: float = 4.0

    def check(self) -> None:
        check_bank_options("crd", self)
        for name in ("ce_weight", "crd_weight", "kd_weight"):
            check_weight(name, getattr(self, name))


@register_method
class CRD(Method):
    """Contrastive representation distillation with a memory bank of one row per training sample."""

    name = "crd"
    Options = CRDOptions
    options: CRDOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        o = self.options
        num_samples, num_negatives = self.bank_rows_and_negatives(other_classes=False)
        self.ce_weight = float(o.ce_weight)
        self.crd_weight = float(o.crd_weight)
        self.kd_weight = float(o.kd_weight)
        self.kd_temperature = float(o.kd_temperature)
        self.student_features = ["pooled"]
        self.teacher_features = ["pooled"]
        s_dim = self.probe(student, ["pooled"])["pooled"].numel()
        t_dim = self.probe(teachers[0], ["pooled"])["pooled"].numel()
        self.criterion = CRDLoss(
            s_dim, t_dim, int(num_samples), int(o.feat_dim), num_negatives, float(o.temperature), float(o.momentum),
            o.sampling,
        )

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        if batch.index is None:
            raise ConfigError(
                f"{self.name} needs the dataset sample indices (batch.index) to address its memory bank; "
                "use a data loader that yields (images, targets, index), as the kdistill engine does"
            )
        num_data = self.criterion.memory.num_data
        index = batch.index.reshape(-1)
        if index.numel() != batch.targets.shape[0]:
            raise ValueError(f"{self.name}: batch.index has {index.numel()} entries for {batch.targets.shape[0]} samples")
        lo, hi = torch.stack(torch.aminmax(index)).tolist()  # one host sync; avoids a device-side assert
        if lo < 0 or hi >= num_data:
            raise ValueError(
                f"{self.name}: batch.index must lie in [0, num_samples={num_data}), got values in [{lo}, {hi}]; "
                "num_samples must be the training-set size"
            )
        crd = self.criterion(student.features["pooled"], teachers[0].features["pooled"], index)
        losses = {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "crd": self.crd_weight * crd,
        }
        if self.kd_weight > 0:
            losses["kd"] = self.kd_weight * kd_loss(student.logits, teachers[0].logits, self.kd_temperature)
        return losses


@dataclass
class CRDKDOptions(CRDOptions):
    """CRD+KD: the CRD-paper combination, γ=1, α=1 (T=4), β=0.8."""

    kd_weight: float = 1.0


@register_method
class CRDKD(CRD):
    """CRD with the KD term switched on by default (``kd_weight`` 1)."""

    name = "crd_kd"
    Options = CRDKDOptions
    options: CRDKDOptions
