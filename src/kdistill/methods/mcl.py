"""Mutual contrastive learning for online distillation, in two versions (docs/online.md).

* ``mcl`` (Yang et al., AAAI 2022): n independent networks (``online.peers``), each with a
  two-layer embedding head; supervised contrastive losses over the batch within each network (VCL)
  and across each pair (ICL), plus their soft versions. No memory bank.
* ``mcl_okd`` (Yang, An & Xu, ICASSP 2021): peer branches over shared low-level stages
  (``online.branch_resnet``), one memory bank of embeddings per branch; every ordered pair of
  branches is contrasted with CRD's binary NCE, and the detached mean logits are distilled into
  the last branch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.features import TappedModel
from kdistill.losses import ContrastSampler, MemoryBank, kd_loss, mcl_losses, mcl_okd_nce
from kdistill.losses._common import upcast
from kdistill.losses.crd import Embed
from kdistill.methods._cohort import member_groups, require_cohort
from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    StepInfo,
    check_bank_options,
    check_positive,
    check_weight,
    register_method,
)
from kdistill.optim import ParamGroup
from kdistill.utils import ConfigError


class ProjectionHead(nn.Module):
    """``normalise(W2 relu(W1 f + b1) + b2)``: MCL's embedding head on a pooled vector."""

    def __init__(self, in_dim: int, dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        z = self.net(torch.flatten(x, 1))
        with torch.autocast(z.device.type, enabled=False):  # the normalisation in float32 under mixed precision
            return F.normalize(upcast(z), dim=1)


@dataclass
class MCLOptions(MethodOptions):
    """Defaults are the authors' CIFAR-100 commands: weights 0.1 (VCL, ICL) and 1 (soft VCL, soft ICL),
    τ = 0.1, T = 3, 128-d embeddings; ``logit_kd_weight`` > 0 adds KL_3 from the detached mean logits."""

    temperature: float = 0.1
    kd_temperature: float = 3.0
    feat_dim: int = 128
    ce_weight: float = 1.0
    vcl_weight: float = 0.1
    soft_vcl_weight: float = 1.0
    icl_weight: float = 0.1
    soft_icl_weight: float = 1.0
    logit_kd_weight: float = 0.0
    icl_same_instance_positive: bool = False

    def check(self) -> None:
        check_positive("temperature", self.temperature)
        check_positive("kd_temperature", self.kd_temperature)
        if int(self.feat_dim) < 1:
            raise ConfigError(f"feat_dim must be >= 1, got {self.feat_dim}")
        for name in ("ce_weight", "vcl_weight", "soft_vcl_weight", "icl_weight", "soft_icl_weight", "logit_kd_weight"):
            check_weight(name, getattr(self, name))


@register_method
class MCL(Method):
    """In-batch mutual contrastive learning between independent networks."""

    name = "mcl"
    Options = MCLOptions
    options: MCLOptions
    needs_teacher = False

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        cohort = require_cohort(self.name, student, trunk=False)
        self.cohort = [cohort]
        self.logit_keys = [f"{n}/logits" for n in cohort.names]
        self.pooled_keys = [f"{n}/pooled" for n in cohort.names]
        self.student_features = [*self.logit_keys, *self.pooled_keys]
        shapes = self.probe(student, self.pooled_keys)
        self.heads = nn.ModuleList(ProjectionHead(shapes[k].numel(), int(self.options.feat_dim)) for k in self.pooled_keys)

    def select_teachers(self, info: StepInfo) -> list[int]:
        return []

    def param_groups(self) -> list[ParamGroup]:
        return member_groups(self.cohort[0], [[h] for h in self.heads])

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        o = self.options
        logits = [student.features[k] for k in self.logit_keys]
        emb = [head(student.features[k]) for head, k in zip(self.heads, self.pooled_keys, strict=True)]
        terms = mcl_losses(emb, batch.targets, o.temperature, o.kd_temperature, o.icl_same_instance_positive)
        losses = {
            "ce": o.ce_weight * sum(F.cross_entropy(z, batch.targets) for z in logits),
            "vcl": o.vcl_weight * terms["vcl"],
            "soft_vcl": o.soft_vcl_weight * terms["soft_vcl"],
            "icl": o.icl_weight * terms["icl"],
            "soft_icl": o.soft_icl_weight * terms["soft_icl"],
        }
        if o.logit_kd_weight > 0:
            mean = torch.stack(logits).mean(0).detach()
            targets = logits if len(logits) == 2 else logits[-1:]  # the authors: every network when n = 2
            losses["logit_kd"] = o.logit_kd_weight * sum(kd_loss(z, mean, o.kd_temperature) for z in targets)
        return losses


@dataclass
class MCLOKDOptions(MethodOptions):
    """Defaults are the authors' CIFAR-100 ResNet commands: γ = 1 (CE), α = 1 (DOT: KL_3 from the
    detached mean logits to the last branch), β = 0.025 (NCE), τ = 0.1, K = 256, 128-d embeddings,
    memory momentum 0.5; negatives from other classes when the run knows the labels."""

    num_samples: int | None = None
    num_negatives: int = 256
    temperature: float = 0.1
    momentum: float = 0.5
    feat_dim: int = 128
    sampling: str = "fast"
    ce_weight: float = 1.0
    dot_weight: float = 1.0
    kd_temperature: float = 3.0
    nce_weight: float = 0.025

    def check(self) -> None:
        check_bank_options("mcl_okd", self)
        for name in ("ce_weight", "dot_weight", "nce_weight"):
            check_weight(name, getattr(self, name))


@register_method
class MCLOKD(Method):
    """Memory-bank MCL between branches over shared low-level stages."""

    name = "mcl_okd"
    Options = MCLOKDOptions
    options: MCLOKDOptions
    needs_teacher = False

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        o = self.options
        cohort = require_cohort(self.name, student, trunk=True)
        self.cohort = [cohort]
        num_samples, k = self.bank_rows_and_negatives(other_classes=True)
        labels = self.facts.train_targets
        self.logit_keys = [f"{n}/logits" for n in cohort.names]
        self.pooled_keys = [f"{n}/pooled" for n in cohort.names]
        self.student_features = [*self.logit_keys, *self.pooled_keys]
        shapes = self.probe(student, self.pooled_keys)
        self.embeds = nn.ModuleList(Embed(shapes[key].numel(), int(o.feat_dim)) for key in self.pooled_keys)
        self.memory = MemoryBank([f"memory_{n}" for n in cohort.names], int(num_samples), int(o.feat_dim), o.momentum)
        self.sampler = ContrastSampler(int(num_samples), k, o.sampling, "exact", labels)

    def select_teachers(self, info: StepInfo) -> list[int]:
        return []

    def param_groups(self) -> list[ParamGroup]:
        return member_groups(self.cohort[0], [[e] for e in self.embeds])

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        o = self.options
        if batch.index is None:
            raise ConfigError(f"{self.name} needs the dataset sample indices (batch.index) to address its memory banks")
        index = batch.index.reshape(-1).to(batch.targets.device)
        logits = [student.features[k] for k in self.logit_keys]
        emb = [embed(student.features[k]) for embed, k in zip(self.embeds, self.pooled_keys, strict=True)]
        nce = mcl_okd_nce(emb, self.memory, self.sampler(index), o.temperature)
        if self.training:
            self.memory.update(index, {name: e for name, e in zip(self.memory.bank_names, emb, strict=True)})
        mean = torch.stack(logits).mean(0).detach()
        return {
            "ce": o.ce_weight * sum(F.cross_entropy(z, batch.targets) for z in logits),
            "dot": o.dot_weight * kd_loss(logits[-1], mean, o.kd_temperature),
            "nce": o.nce_weight * nce,
        }
