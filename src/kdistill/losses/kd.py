"""Hinton et al., "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import float32_loss


@float32_loss
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), KL summed over classes, averaged over the batch.

    The paper's soft-target loss with the CIFAR-100 benchmark's T² scaling (docs/methods/kd.md).
    ``teacher_logits`` receive no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * temperature**2
