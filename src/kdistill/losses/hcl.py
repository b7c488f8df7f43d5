"""Hierarchical context loss (HCL) of ReviewKD (Chen et al., CVPR 2021, arXiv 2104.09044).

docs/methods/reviewkd.md. Per stage, with student output S and teacher target T of equal shape N×C×h×w:

    L = MSE(S, T); c = 1; τ = 1
    for l in levels (default 4, 2, 1):
        skip if l >= h                      (only the height decides, as in the released code)
        c = c · decay;  L += c · MSE(P_l(S), P_l(T));  τ += c
    stage loss = L / τ

where MSE averages over all elements and P_l is adaptive average pooling to l×l (PyTorch's
overlapping-window operator for non-divisible sizes). Stages are summed with equal weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import float32_loss

SKIP_RULES = ("height", "min_hw")


def _stage_hcl(student: Tensor, teacher: Tensor, levels: Sequence[int], decay: float, skip_rule: str) -> Tensor:
    h, w = student.shape[-2:]
    limit = h if skip_rule == "height" else min(h, w)
    loss = F.mse_loss(student, teacher)
    weight, total = 1.0, 1.0
    for level in levels:
        if level >= limit:
            continue
        weight *= decay
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(student, level), F.adaptive_avg_pool2d(teacher, level))
        total += weight
    return loss / total


@float32_loss
def hcl_loss(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    levels: Sequence[int] = (4, 2, 1),
    level_weight_decay: float = 0.5,
    skip_rule: str = "height",
) -> Tensor:
    """Sum over stages of the hierarchical context loss (ReviewKD, Chen et al., CVPR 2021).

    ``student_features[i]`` and ``teacher_features[i]`` are N×C×h×w tensors of equal shape (the
    ABF outputs and the teacher targets). ``levels=()`` gives the plain per-stage MSE (the
    "without HCL" ablation of the paper). ``skip_rule="height"`` is the released code's rule (a
    level l is skipped when l >= h); ``"min_hw"`` skips when l >= min(h, w).
    Teacher targets are detached.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"hcl_loss: {len(student_features)} student features but {len(teacher_features)} teacher features"
        )
    if not student_features:
        raise ValueError("hcl_loss: no features given")
    if skip_rule not in SKIP_RULES:
        raise ValueError(f"hcl_loss: skip_rule must be one of {SKIP_RULES}, got {skip_rule!r}")
    if any(int(level) != level or level < 1 for level in levels):
        raise ValueError(f"hcl_loss: levels must be positive integers, got {tuple(levels)}")
    if not level_weight_decay > 0:
        raise ValueError(f"hcl_loss: level_weight_decay must be > 0, got {level_weight_decay}")
    total: Tensor | None = None
    for i, (s, t) in enumerate(zip(student_features, teacher_features, strict=True)):
        if s.dim() != 4 or s.shape != t.shape:
            raise ValueError(
                f"hcl_loss: stage {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must be equal N×C×h×w shapes"
            )
        stage = _stage_hcl(
            s.float(), t.detach().float(), [int(level) for level in levels], level_weight_decay, skip_rule
        )
        total = stage if total is None else total + stage
    assert total is not None
    return total
