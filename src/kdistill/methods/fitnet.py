"""FitNet (hint learning): CE + β·MSE(ConvReg(student hint), teacher hint) (Romero et al., ICLR 2015);
docs/methods/fitnet.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.features import TappedModel
from kdistill.losses import fitnet_loss
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


class ConvReg(nn.Module):
    """Map a student hint C_s@H_s×W_s to the teacher's C_t@H_t×W_t: conv, BatchNorm(C_t), ReLU.

    The conv is chosen from the spatial sizes as in the CIFAR-100 benchmark code, in this order:

    * H_s = 2·H_t (and W_s = 2·W_t): Conv2d 3×3, stride 2, padding 1;
    * 2·H_s = H_t (and 2·W_s = W_t): ConvTranspose2d 4×4, stride 2, padding 1;
    * H_s ≥ H_t and W_s ≥ W_t: Conv2d with kernel (1 + H_s − H_t) × (1 + W_s − W_t) (1×1 when equal);
    * anything else raises ``ValueError`` (the reference returns ``NotImplemented``).

    All convs have a bias. ``kind`` names the choice ("conv3x3_s2", "deconv4x4_s2", "conv").
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(
                f"ConvReg needs C×H×W shapes, got student {tuple(student_shape)} and teacher {tuple(teacher_shape)}"
            )
        s_c, s_h, s_w = student_shape
        t_c, t_h, t_w = teacher_shape
        if s_h == 2 * t_h and s_w == 2 * t_w:
            self.kind = "conv3x3_s2"
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
        elif 2 * s_h == t_h and 2 * s_w == t_w:
            self.kind = "deconv4x4_s2"
            self.conv = nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            self.kind = "conv"
            self.conv = nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"ConvReg cannot map a student hint of size {s_h}×{s_w} to a teacher hint of size {t_h}×{t_w}; "
                "supported: student twice the teacher size, half of it, or larger or equal in both axes"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU() if use_relu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


@dataclass
class FitNetOptions(MethodOptions):
    """β=100; the hint is stage ``hint_layer`` (0 = stem, k = stage k)."""

    ce_weight: float = 1.0
    feat_weight: float = 100.0
    hint_layer: int = 2

    def check(self) -> None:
        if not (isinstance(self.hint_layer, int) and self.hint_layer >= 0):
            raise ConfigError(f"hint_layer must be an integer >= 0 (0 = stem, k = stage k), got {self.hint_layer!r}")
        check_weight("ce_weight", self.ce_weight)
        check_weight("feat_weight", self.feat_weight)


@register_method
class FitNet(Method):
    """Hint = post-ReLU output of stage ``hint_layer`` (``feat[2]`` = ``stage2``: ``feat[0]`` is the stem).

    Trained jointly from the start (no separate hint stage); β=100. The regressor is sized by a
    dry run of both models and trained with the student.
    """

    name = "fitnet"
    Options = FitNetOptions
    options: FitNetOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        self.require_one_teacher()
        o = self.options
        self.ce_weight = float(o.ce_weight)
        self.feat_weight = float(o.feat_weight)
        self.hint_key = "stem" if o.hint_layer == 0 else f"stage{o.hint_layer}"
        self.student_features = [self.hint_key]
        self.teacher_features = [self.hint_key]
        s_shape = self.probe(student, [self.hint_key])[self.hint_key]
        t_shape = self.probe(teachers[0], [self.hint_key])[self.hint_key]
        try:
            self.regressor = ConvReg(s_shape, t_shape)
        except ValueError as err:
            raise ConfigError(f"fitnet hint {self.hint_key!r}: {err}") from err

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        regressed = self.regressor(student.features[self.hint_key])
        loss = fitnet_loss(regressed, teachers[0].features[self.hint_key])
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "fitnet": self.feat_weight * loss,
        }
