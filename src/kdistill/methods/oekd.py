"""Online ensemble model compression (Walawalkar, Shen & Savvides, ECCV 2020).

N students of decreasing width share a common base (``online.oekd_resnet``); student 1 (full
width) is the pseudo-teacher. Every student learns from the labels and from the detached ensemble
of all students' logits; students 2..N also mimic the pseudo-teacher's detached stage outputs
through 1×1 convolution adapters. One run yields N compressed students (docs/online.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.features import TappedModel, stage_taps
from kdistill.losses import oekd_loss
from kdistill.methods._cohort import member_groups, params, require_cohort
from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    StepInfo,
    check_choice,
    check_positive,
    check_weight,
    register_method,
)
from kdistill.optim import ParamGroup


@dataclass
class OEKDOptions(MethodOptions):
    """Defaults are the paper's CIFAR-100 ResNet-110 setting.

    ``alpha``/``beta``/``gamma`` weigh the CE, the intermediate (adapter MSE) and the ensemble KD
    terms; ``temperature`` T of the KD term; ``adapter_lr_scale`` the adapters' share of the base lr
    (the authors add them at half the lr); ``ensemble_weights`` ``uniform`` (the paper's effective
    behaviour) or ``learned`` (softmax weights trained on the ensemble's cross-entropy);
    ``optimizer`` ``adam`` (the paper: Adam, lr 1e-3, wd 1e-5 from the recipe) or ``sgd``.
    """

    alpha: float = 0.7
    beta: float = 0.15
    gamma: float = 0.15
    temperature: float = 2.0
    adapter_lr_scale: float = 0.5
    ensemble_weights: str = "uniform"
    optimizer: str = "adam"

    def check(self) -> None:
        for name in ("alpha", "beta", "gamma", "adapter_lr_scale"):
            check_weight(name, getattr(self, name))
        check_positive("temperature", self.temperature)
        check_choice("ensemble_weights", self.ensemble_weights, ["uniform", "learned"])
        check_choice("optimizer", self.optimizer, ["adam", "sgd"])


@register_method
class OEKD(Method):
    """The student ensemble: CE + adapter MSE to the pseudo-teacher + KD from the ensemble."""

    name = "oekd"
    Options = OEKDOptions
    options: OEKDOptions
    needs_teacher = False

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        cohort = require_cohort(self.name, student, trunk=True)
        self.cohort = [cohort]  # a list: not registered as a submodule
        names = cohort.names
        # every student's stage outputs, from the cohort's preset (student1/stage1, ...)
        self.stages = [k.split("/", 1)[1] for k in stage_taps(cohort) if k.startswith(f"{names[0]}/stage")]
        self.logit_keys = [f"{n}/logits" for n in names]
        self.stage_keys = [[f"{n}/{s}" for s in self.stages] for n in names]
        self.student_features = [*self.logit_keys, *(k for keys in self.stage_keys for k in keys)]
        shapes = self.probe(student, [k for keys in self.stage_keys for k in keys])
        # Ad_jk: student j's stage k -> the pseudo-teacher's channels (1×1 conv with bias), trained from step 0
        self.adapters = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(shapes[s][0], shapes[t][0], 1) for s, t in zip(keys, self.stage_keys[0], strict=True))
            for keys in self.stage_keys[1:]
        )
        if self.options.ensemble_weights == "learned":
            self.ensemble_logit_weights = nn.Parameter(torch.zeros(len(names)))

    def select_teachers(self, info: StepInfo) -> list[int]:
        return []

    def param_groups(self) -> list[ParamGroup]:
        o = self.options
        settings = {"optimizer": o.optimizer}
        groups = member_groups(self.cohort[0], **settings)
        groups.append(ParamGroup("adapters", params(self.adapters), lr_scale=o.adapter_lr_scale, **settings))
        if o.ensemble_weights == "learned":
            groups.append(ParamGroup("ensemble_weights", [self.ensemble_logit_weights], **settings))
        return groups

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        o = self.options
        logits = [student.features[k] for k in self.logit_keys]
        features = [[student.features[k] for k in keys] for keys in self.stage_keys]
        weights = None
        losses = {}
        if o.ensemble_weights == "learned":
            weights = torch.softmax(self.ensemble_logit_weights, 0)
            mixed = torch.einsum("n,nbc->bc", weights, torch.stack([z.detach() for z in logits]))
            losses["ensemble_ce"] = F.cross_entropy(mixed, batch.targets)
            weights = weights.detach()
        adapters = [list(a) for a in self.adapters]
        losses.update(oekd_loss(logits, batch.targets, features, adapters, o.alpha, o.beta, o.gamma, o.temperature,
                                weights))
        return losses
