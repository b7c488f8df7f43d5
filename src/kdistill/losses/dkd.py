"""Decoupled knowledge distillation (Zhao et al., CVPR 2022, arXiv 2203.08679); docs/methods/dkd.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import float32_loss, upcast


def _log_parts(logits: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """log p_y, log(1 − p_y) and the non-target log-softmax of ``logits`` (already /T).

    The non-target log-softmax keeps the B×C layout with 0 at the target column (``nckd`` masks it
    out): no boolean indexing, so the shapes never depend on the data and ``torch.compile`` traces
    it as one graph. Everything is a difference of log-sum-exps, so nothing underflows (the
    reference takes the log of probabilities after masking the target logit with −1000).
    """
    lse_all = torch.logsumexp(logits, dim=1)
    target_logit = torch.where(target_mask, logits, 0.0).sum(dim=1)
    lse_others = torch.logsumexp(logits.masked_fill(target_mask, float("-inf")), dim=1)
    others = (logits - lse_others.unsqueeze(1)).masked_fill(target_mask, 0.0)
    return target_logit - lse_all, lse_others - lse_all, others


@float32_loss
def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """α·TCKD + β·NCKD (DKD paper eq. 7; no warm-up factor, the ``dkd`` method applies it).

    With p = softmax(z/T) and target class y:

    * TCKD = T² · mean_b KL(b_t ‖ b_s), b = [p_y, 1 − p_y] (binary target/non-target split);
    * NCKD = T² · mean_b KL(p̂_t ‖ p̂_s), p̂_c = exp(z_c/T) / Σ_{c'≠y} exp(z_{c'}/T) for c ≠ y.

    Computed in log space (log-sum-exp over the non-target logits) rather than with the reference's
    −1000 target mask; the values are the same. ``teacher_logits`` receive no gradient.
    Identity: ``kd_loss = TCKD + (1 − p^t_y)·NCKD`` at the same T.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"dkd_loss expects B×C logits of equal shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    classes = student_logits.shape[1]
    if classes < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes, got {classes}")
    if target.shape != student_logits.shape[:1]:
        raise ValueError(f"target must have shape ({student_logits.shape[0]},), got {tuple(target.shape)}")
    mask = F.one_hot(target.long(), classes).bool()
    log_ps_y, log_ps_not, log_ps_hat = _log_parts(upcast(student_logits) / temperature, mask)
    log_pt_y, log_pt_not, log_pt_hat = _log_parts(upcast(teacher_logits.detach()) / temperature, mask)

    tckd = log_pt_y.exp() * (log_pt_y - log_ps_y) + log_pt_not.exp() * (log_pt_not - log_ps_not)
    nckd = (log_pt_hat.exp().masked_fill(mask, 0.0) * (log_pt_hat - log_ps_hat)).sum(dim=1)
    return temperature**2 * (alpha * tckd.mean() + beta * nckd.mean())
