"""HKD: holistic knowledge distillation with a graph over the batch (Zhou et al., ICCV 2021).

Offline (a frozen teacher): trainable embedding heads on both networks' pooled features, two
memory banks (student and teacher embeddings, momentum 0.9), an individual InfoNCE term against the
other network's stored embedding of the same sample, and a holistic term after a one-hop graph
convolution over each network's kNN graph of the batch (docs/online.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from kdistill.features import TappedModel
from kdistill.losses import ContrastSampler, GraphConv1Hop, MemoryBank, hkd_losses, kd_loss, knn_graph
from kdistill.losses.crd import Embed
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
class HKDOptions(MethodOptions):
    """Defaults are the authors' CIFAR-100 settings: γ = 1 (CE), β = 3 (contrastive terms), α = 0 (KD;
    1 for ``hkd_kd``, T = 4), τ = 0.07, K = 16384 negatives of other classes, 128-d embeddings,
    memory momentum 0.9, k = 8 neighbours, positive mix 0.75 of the stored embedding."""

    num_samples: int | None = None
    num_negatives: int = 16384
    temperature: float = 0.07
    momentum: float = 0.9
    feat_dim: int = 128
    neighbours: int = 8
    mix: float = 0.75
    sampling: str = "fast"
    ce_weight: float = 1.0
    hkd_weight: float = 3.0
    kd_weight: float = 0.0
    kd_temperature: float = 4.0

    def check(self) -> None:
        check_bank_options("hkd", self)
        if int(self.neighbours) < 1:
            raise ConfigError(f"hkd: neighbours must be >= 1, got {self.neighbours}")
        if not 0 <= self.mix <= 1:
            raise ConfigError(f"hkd: mix must be in [0, 1], got {self.mix}")
        for name in ("ce_weight", "hkd_weight", "kd_weight"):
            check_weight(name, getattr(self, name))


@register_method
class HKD(Method):
    """Individual + holistic (graph) contrastive distillation from a frozen teacher."""

    name = "hkd"
    Options = HKDOptions
    options: HKDOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        o = self.options
        num_samples, k = self.bank_rows_and_negatives(other_classes=True)
        labels = self.facts.train_targets
        self.student_features = ["pooled"]
        self.teacher_features = ["pooled"]
        s_dim = self.probe(student, ["pooled"])["pooled"].numel()
        t_dim = self.probe(teachers[0], ["pooled"])["pooled"].numel()
        d = int(o.feat_dim)
        self.embed_student, self.embed_teacher = Embed(s_dim, d), Embed(t_dim, d)
        self.graph_student, self.graph_teacher = GraphConv1Hop(d), GraphConv1Hop(d)
        self.memory = MemoryBank(["memory_student", "memory_teacher"], int(num_samples), d, o.momentum)
        self.sampler = ContrastSampler(int(num_samples), k, o.sampling, "none", labels)

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        o = self.options
        if batch.index is None:
            raise ConfigError(f"{self.name} needs the dataset sample indices (batch.index) to address its memory banks")
        index = batch.index.reshape(-1).to(batch.targets.device)
        teacher = teachers[0]
        h_s = self.embed_student(student.features["pooled"])
        h_t = self.embed_teacher(teacher.features["pooled"].detach())
        g_s = g_t = None
        if h_s.shape[0] >= int(o.neighbours):  # the holistic term needs a batch of at least k samples
            g_s = self.graph_student(h_s, knn_graph(student.logits, int(o.neighbours)))
            g_t = self.graph_teacher(h_t, knn_graph(teacher.logits, int(o.neighbours)))
        terms = hkd_losses(h_s, h_t, g_s, g_t, self.memory.memory_student, self.memory.memory_teacher, index,
                           self.sampler(index), o.temperature, o.mix)
        if self.training:
            self.memory.update(index, {"memory_student": h_s, "memory_teacher": h_t})
        losses = {"ce": o.ce_weight * F.cross_entropy(student.logits, batch.targets)}
        losses["individual"] = o.hkd_weight * terms["individual"]
        if "holistic" in terms:
            losses["holistic"] = o.hkd_weight * terms["holistic"]
        if o.kd_weight > 0:
            losses["kd"] = o.kd_weight * kd_loss(student.logits, teacher.logits, o.kd_temperature)
        return losses


@dataclass
class HKDKDOptions(HKDOptions):
    """HKD+KD: the KD term switched on (α = 1, T = 4)."""

    kd_weight: float = 1.0


@register_method
class HKDKD(HKD):
    """HKD with the KD term on by default (``kd_weight`` 1)."""

    name = "hkd_kd"
    Options = HKDKDOptions
    options: HKDKDOptions
