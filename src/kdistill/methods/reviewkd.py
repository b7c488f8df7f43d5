"""ReviewKD: "Distilling Knowledge via Knowledge Review" (Chen et al., CVPR 2021, arXiv 2104.09044).

Teacher stage i is matched against a fusion of student stages i..n (the review mechanism),
computed from the deepest stage down by attention-based fusion (ABF) modules, and the outputs are
compared with the hierarchical context loss (``kdistill.losses.hcl_loss``); docs/methods/reviewkd.md.

Everything the released code configures by hand (channel lists, ``shapes``, ``out_shapes``) is
read here from a dry run of student and teacher (a wrong hand-set value breaks the reference's
attention reshape or resizes silently); explicit lists are accepted for reproduction and checked against the probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.features import TappedModel
from kdistill.losses.hcl import SKIP_RULES, hcl_loss
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

Size = tuple[int, int]
FUSIONS = ("attention", "sum")


def _size(value: int | Sequence[int] | None) -> Size | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


class ABF(nn.Module):
    """Attention-based fusion module of ReviewKD (names ``conv1``/``conv2``/``att_conv`` as in
    the released code, so its distiller checkpoints map one to one).

    ``conv1``: 1×1 conv + BN (C_in → C_m); ``conv2``: 3×3 conv + BN (C_m → C_out), both without
    bias or activation, weights Kaiming-uniform with ``a=1``. ``att_conv`` (only when ``fuse`` with
    ``fusion="attention"``): 1×1 conv (2·C_m → 2, with bias, PyTorch default init) + sigmoid.
    ``fusion="sum"`` adds the residual instead (the paper's "without ABF" ablation).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool, fusion: str = "attention"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"ABF fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fuse = fuse
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.att_conv: nn.Sequential | None = None
        if fuse and fusion == "attention":
            self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None = None,
        shape: int | Sequence[int] | None = None,
        out_shape: int | Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(output, residual)``.

        ``residual`` (from the next-deeper ABF) is resized (nearest) to ``shape``, which must be
        ``x``'s own size (default); ``out_shape`` (CIFAR variant, step 3) resizes the fused map to
        the teacher's size before ``conv2``. The returned residual is the fused C_m-channel map
        before ``conv2`` and after that resize.
        """
        x = self.conv1(x)
        hw = tuple(x.shape[-2:])
        if self.fuse:
            if residual is None:
                raise ValueError("a fusing ABF needs the residual of the next-deeper ABF")
            target = _size(shape) or hw
            if target != hw:
                raise ValueError(f"ABF shape {target} must equal the student feature size {hw}")
            y = F.interpolate(residual, size=hw, mode="nearest")
            if self.att_conv is None:
                x = x + y
            else:
                z = self.att_conv(torch.cat([x, y], dim=1))
                x = x * z[:, 0:1] + y * z[:, 1:2]
        out_hw = _size(out_shape)
        if out_hw is not None and out_hw != hw:
            x = F.interpolate(x, size=out_hw, mode="nearest")
        return self.conv2(x), x


def _fmt(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


@dataclass
class ReviewKDOptions(MethodOptions):
    """ReviewKD's options and defaults; what each means is in the ``ReviewKD`` docstring."""

    loss_weight: float = 1.0
    ce_weight: float = 1.0
    warmup_epochs: int = 20
    EPOCH_DEFAULTS: ClassVar[dict[str, int]] = {"warmup_epochs": 240}  # CIFAR's 240-epoch schedule
    warmup_epoch_base: int = 0
    mid_channels: int | None = None
    max_mid_channels: int = 512
    student_preact: bool = False
    teacher_preact: bool = True
    levels: tuple[int, ...] = (4, 2, 1)
    level_weight_decay: float = 0.5
    hcl_skip_rule: str = "height"
    fusion: str = "attention"
    resize_to_teacher: bool = True
    in_channels: list[int] | None = None
    out_channels: list[int] | None = None
    shapes: list[int | list[int]] | None = None
    out_shapes: list[int | list[int]] | None = None

    def check(self) -> None:
        check_weight("loss_weight", self.loss_weight)
        check_weight("ce_weight", self.ce_weight)
        if int(self.warmup_epochs) != self.warmup_epochs or self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be an integer >= 0, got {self.warmup_epochs}")
        if self.warmup_epoch_base not in (0, 1):
            raise ConfigError(
                f"warmup_epoch_base must be 0 (official) or 1 (mdistiller), got {self.warmup_epoch_base}"
            )
        if self.hcl_skip_rule not in SKIP_RULES:
            raise ConfigError(f"hcl_skip_rule must be one of {SKIP_RULES}, got {self.hcl_skip_rule!r}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if any(int(level) != level or level < 1 for level in self.levels):
            raise ConfigError(f"levels must be positive integers, got {list(self.levels)}")
        if not self.level_weight_decay > 0:
            raise ConfigError(f"level_weight_decay must be > 0, got {self.level_weight_decay}")
        if self.max_mid_channels < 1:
            raise ConfigError(f"max_mid_channels must be >= 1, got {self.max_mid_channels}")
        if self.mid_channels is not None and (int(self.mid_channels) != self.mid_channels or self.mid_channels < 1):
            raise ConfigError(f"mid_channels must be a positive integer or null, got {self.mid_channels}")


@register_method
class ReviewKD(Method):
    """ReviewKD for classification: CE + λ·warm-up(e)·Σ HCL(ABF outputs, teacher targets).

    Features: student and teacher stages ``stage1..stageK`` plus ``pooled`` (the stem is unused,
    as in the authors' code); the pooled vector is treated as C×1×1. ABF[0] takes the pooled vector and does not
    fuse; ABF[k] takes stage K+1-k and fuses the residual of ABF[k-1]. All channels and sizes come
    from ``self.probe``; ABFs whose student stage is smaller than the teacher's resize to the
    teacher size before ``conv2`` (``resize_to_teacher``, the CIFAR variant's ``out_shape`` step),
    which needs an integer ratio. The method's parameters are exactly the ABFs.

    Options (docs/methods/reviewkd.md):

    * ``loss_weight`` λ; ``ce_weight`` (1.0); ``warmup_epochs`` (20; 0 = none, as on ImageNet).
    * ``warmup_epoch_base``: factor = min(1, (epoch + base) / warmup_epochs) with the 0-indexed
      trainer epoch. 0 (default) is the official code: the first epoch has no review loss and the
      full weight starts at epoch 20. 1 is mdistiller (first epoch already at 1/20). Default 0
      because the published numbers were produced by that schedule and no evidence favours
      the shift.
    * ``mid_channels`` C_m: default min(``max_mid_channels``, student pooled width);
      an explicit value is honoured (256 for the official ResNet50→MobileNetV1 pair; mdistiller's
      ignored ``MAX_MID_CHANNEL`` is not reproduced).
    * ``student_preact`` (False) / ``teacher_preact`` (True): pre-ReLU stage taps. The defaults are
      the official CIFAR setting that produced the published table (post-ReLU student, pre-ReLU
      teacher); the asymmetry was not deliberate (the authors say so), so the ImageNet recipes set both
      to True as the official ImageNet code does.
    * ``levels``, ``level_weight_decay``, ``hcl_skip_rule``: HCL; ``levels=[]``
      gives plain MSE (the "without HCL" ablation). ``fusion="sum"``: the "without ABF" ablation.
    * ``in_channels``/``out_channels`` (shallow→deep, pooled last) and ``shapes``/``out_shapes``
      (deep→shallow, pooled first), as in the released configs: optional, validated against the
      probe (the official resnet list's fifth superfluous shape must be
      dropped).

    Teacher: always in eval mode under inference mode (the ``Distiller`` does that). The official
    CIFAR code leaves the teacher in train mode (BN on batch statistics, running statistics
    drifting); that is not reproduced: the targets then depend on the batch and the
    teacher changes during distillation. A batch of one in training mode is rejected because the
    pooled ABF applies BatchNorm to 1×1 maps.
    """

    name = "reviewkd"
    Options = ReviewKDOptions
    options: ReviewKDOptions

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        o = self.options
        if len(teachers) != 1:
            raise ConfigError(f"reviewkd distils from exactly one teacher, got {len(teachers)}")
        self.loss_weight = float(o.loss_weight)
        self.ce_weight = float(o.ce_weight)
        self.warmup_epochs = int(o.warmup_epochs)
        self.warmup_epoch_base = int(o.warmup_epoch_base)
        self.levels = tuple(int(level) for level in o.levels)
        self.level_weight_decay = float(o.level_weight_decay)
        self.hcl_skip_rule = o.hcl_skip_rule
        self.resize_to_teacher = bool(o.resize_to_teacher)
        self.student_preact = bool(o.student_preact)
        self.teacher_preact = bool(o.teacher_preact)

        teacher = teachers[0]
        s_keys = self._feature_keys(student, teacher=False, preact=self.student_preact)
        t_keys = self._feature_keys(teacher, teacher=True, preact=self.teacher_preact)
        s_shapes = self._probe_chw(student, s_keys, self.student_preact, teacher=False)
        t_shapes = self._probe_chw(teacher, t_keys, self.teacher_preact, teacher=True)
        self.student_features, self.teacher_features = s_keys, t_keys
        self._check_pairs(s_keys, s_shapes, t_keys, t_shapes)

        # the released configs' list conventions: channels shallow→deep (pooled last), sizes deep→shallow
        self.in_channels = [s_shapes[k][0] for k in s_keys]
        self.out_channels = [t_shapes[k][0] for k in t_keys]
        self.shapes = [s_shapes[k][1:] for k in reversed(s_keys)]
        self.out_shapes = [
            t_shapes[k][1:] if self.resize_to_teacher else s_shapes[sk][1:]
            for k, sk in zip(reversed(t_keys), reversed(s_keys), strict=True)
        ]
        self._check_explicit("in_channels", o.in_channels, self.in_channels, channels=True)
        self._check_explicit("out_channels", o.out_channels, self.out_channels, channels=True)
        self._check_explicit("shapes", o.shapes, self.shapes, channels=False)
        self._check_explicit("out_shapes", o.out_shapes, self.out_shapes, channels=False)

        self.mid_channels = (
            int(o.mid_channels) if o.mid_channels is not None else min(o.max_mid_channels, self.in_channels[-1])
        )

        # built shallow→deep as in the released code, then reversed so abfs[0] is the pooled ABF
        n = len(self.in_channels)
        abfs = [
            ABF(c_in, self.mid_channels, c_out, fuse=i < n - 1, fusion=o.fusion)
            for i, (c_in, c_out) in enumerate(zip(self.in_channels, self.out_channels, strict=True))
        ]
        self.abfs = nn.ModuleList(abfs[::-1])

    # --- configuration --------------------------------------------------------------------------
    def _feature_keys(self, net: TappedModel, teacher: bool, preact: bool) -> list[str]:
        """``stage1..stageK`` (the family's preset merged with the user's taps) plus ``pooled``."""
        stages = net.stages(preact)
        expected = [f"stage{i}" for i in range(1, len(stages) + 1)]
        if stages != expected:
            role = "teacher" if teacher else "student"
            raise ConfigError(f"reviewkd: {role} stage taps must be numbered {expected}, got {stages}")
        return [*stages, "pooled"]

    def _probe_chw(self, net: TappedModel, keys: list[str], preact: bool, teacher: bool) -> dict[str, tuple[int, ...]]:
        """Probed C×H×W per key; a flat pooled vector (C) counts as C×1×1."""
        role = "teacher" if teacher else "student"
        shapes = {k: tuple(int(d) for d in v) for k, v in self.probe(net, keys, preact).items()}
        pooled = shapes["pooled"]
        if len(pooled) == 1:
            shapes["pooled"] = (pooled[0], 1, 1)
        elif len(pooled) != 3 or pooled[1:] != (1, 1):
            raise ConfigError(f"reviewkd: {role} 'pooled' must be a C or Cx1x1 vector, got {_fmt(pooled)}")
        for k in keys[:-1]:
            if len(shapes[k]) != 3:
                raise ConfigError(f"reviewkd: {role} {k} must be a CxHxW feature map, got {_fmt(shapes[k])}")
        return shapes

    def _check_pairs(
        self,
        s_keys: list[str],
        s_shapes: dict[str, tuple[int, ...]],
        t_keys: list[str],
        t_shapes: dict[str, tuple[int, ...]],
    ) -> None:
        """One ConfigError listing every stage when counts differ or a student size cannot reach the teacher's."""

        def listing(keys: list[str], shapes: dict[str, tuple[int, ...]]) -> str:
            return ", ".join(f"{k} {_fmt(shapes[k])}" for k in keys)

        if len(s_keys) != len(t_keys):
            raise ConfigError(
                f"reviewkd: student has {len(s_keys) - 1} stages + pooled ({listing(s_keys, s_shapes)}) but "
                f"teacher has {len(t_keys) - 1} stages + pooled ({listing(t_keys, t_shapes)}); "
                "give matching stage taps (student_taps/teacher_taps) for both"
            )
        problems = []
        for s_key, t_key in zip(s_keys, t_keys, strict=True):
            (_, sh, sw), (_, th, tw) = s_shapes[s_key][:3], t_shapes[t_key][:3]
            if (sh, sw) == (th, tw):
                continue
            pair = f"student {s_key} {_fmt(s_shapes[s_key])} vs teacher {t_key} {_fmt(t_shapes[t_key])}"
            if sh > th or sw > tw:
                problems.append(f"{pair}: student map larger than the teacher's")
            elif not self.resize_to_teacher:
                problems.append(f"{pair}: sizes differ and resize_to_teacher is false")
            elif th % sh or tw % sw:
                problems.append(f"{pair}: teacher size is not an integer multiple of the student size")
        if problems:
            raise ConfigError(
                "reviewkd: impossible stage shapes: " + "; ".join(problems) + ". All stages: student "
                f"[{listing(s_keys, s_shapes)}], teacher [{listing(t_keys, t_shapes)}]"
            )

    @staticmethod
    def _check_explicit(name: str, given: Sequence | None, probed: list, channels: bool) -> None:
        if given is None:
            return
        norm = [int(v) for v in given] if channels else [_size(v) for v in given]
        want = probed if channels else [tuple(v) for v in probed]
        if norm != want:
            shown = want if channels else [h if h == w else [h, w] for h, w in want]
            order = "shallow->deep, pooled last" if channels else "deep->shallow, pooled first"
            raise ConfigError(f"reviewkd: {name}={list(given)} does not match the probed models: {shown} ({order})")

    # --- training ----------------------------------------------------------------------------------
    def warmup_factor(self, epoch: int) -> float:
        """min(1, (epoch + warmup_epoch_base) / warmup_epochs) for the 0-indexed ``epoch``."""
        if self.warmup_epochs == 0:
            return 1.0
        return min(1.0, (epoch + self.warmup_epoch_base) / self.warmup_epochs)

    def review(self, features: Sequence[Tensor], targets: Sequence[Tensor] | None = None) -> list[Tensor]:
        """The review chain: ABF outputs shallow→deep for student features shallow→deep
        (pooled last, N×C×1×1). ``targets`` (teacher maps) give the ``out_shape`` sizes; without
        them the probed sizes are used."""
        feats = list(features)[::-1]
        if targets is not None:
            out_sizes = [tuple(t.shape[-2:]) if self.resize_to_teacher else None for t in list(targets)[::-1]]
        else:
            out_sizes = [tuple(s) for s in self.out_shapes]
        out, residual = self.abfs[0](feats[0], out_shape=out_sizes[0])
        outputs = [out]
        for abf, x, out_size in zip(self.abfs[1:], feats[1:], out_sizes[1:], strict=True):
            out, residual = abf(x, residual, out_shape=out_size)
            outputs.insert(0, out)
        return outputs

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        s_feats = [student.features[k] for k in self.student_features]
        t_feats = [teachers[0].features[k] for k in self.teacher_features]
        s_feats[-1] = s_feats[-1].reshape(s_feats[-1].shape[0], -1, 1, 1)
        t_feats[-1] = t_feats[-1].reshape(t_feats[-1].shape[0], -1, 1, 1)
        if self.training and s_feats[0].shape[0] < 2:
            raise ValueError(
                "reviewkd needs a per-device batch of at least 2 in training (BatchNorm on the pooled 1x1 map)"
            )
        outputs = self.review(s_feats, t_feats)
        review = hcl_loss(outputs, t_feats, self.levels, self.level_weight_decay, self.hcl_skip_rule)
        return {
            "ce": self.ce_weight * F.cross_entropy(student.logits, batch.targets),
            "reviewkd": self.loss_weight * self.warmup_factor(info.epoch) * review,
        }
