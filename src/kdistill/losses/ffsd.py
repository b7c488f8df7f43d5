"""Feature fusion and self-distillation (Li et al., IEEE TNNLS 2022).

Helpers of the FFSD losses: attention maps, the per-sample normalised distance between them,
the diversity target that pushes a common student's attention away from its predecessor's, and
the warm-up of the auxiliary weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdistill.losses._common import float32_loss


@float32_loss
def attention_map(feature: Tensor) -> Tensor:
    """``a(F) = 1/C Σ_c F_c²`` of a B×C×H×W map (not normalised): B×H×W."""
    if feature.dim() != 4:
        raise ValueError(f"expected a B×C×H×W feature map, got shape {tuple(feature.shape)}")
    return feature.float().pow(2).mean(1)


@float32_loss
def normalized_distance(x: Tensor, y: Tensor) -> Tensor:
    """``D(x, y) = mean((vec x/‖vec x‖ - vec y/‖vec y‖)²)``, each sample flattened and L2-normalised."""
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    a = F.normalize(x.float().flatten(1), dim=1)
    b = F.normalize(y.float().flatten(1), dim=1)
    return (a - b).pow(2).mean()


@float32_loss
def diversity_target(attention: Tensor) -> Tensor:
    """The map a common student's attention is pushed towards, from its predecessor's ``attention``.

    Per sample (flattened to HW entries): ``c = ‖y‖``, ``ŷ = y/c`` and ``θ`` the largest of the
    lowest ``⌊HW/3⌋`` entries of ``ŷ``; the target keeps ``ŷ`` below ``θ``, reflects it to ``c - ŷ``
    above ``θ`` and is ``c/2`` where ``ŷ = θ``. Detached. Shape B×HW.
    """
    y = attention.detach().float().flatten(1)
    hw = y.shape[1]
    k = max(1, hw // 3)
    c = y.norm(dim=1, keepdim=True)
    y_hat = y / c.clamp_min(1e-12)
    theta = y_hat.kthvalue(k, dim=1, keepdim=True).values
    half = (c / 2).expand_as(y_hat)
    return torch.where(y_hat < theta, y_hat, torch.where(y_hat > theta, c - y_hat, half))


@float32_loss
def diversity_loss(attention: Tensor, previous_attention: Tensor) -> Tensor:
    """``Div = mean((normalise(a_i) - target(sg a_{i-1}))²)`` on B×H×W attention maps."""
    target = diversity_target(previous_attention)
    return (F.normalize(attention.float().flatten(1), dim=1) - target).pow(2).mean()


def ffsd_warmup(weight: float, epoch: int, warmup_epochs: int = 5) -> float:
    """``λ·exp(-5(1 - e/E)²)`` for 0-indexed epochs ``e ≤ E``, then ``λ`` (E = ``warmup_epochs``)."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return float(weight)
    return float(weight) * math.exp(-5.0 * (1.0 - epoch / warmup_epochs) ** 2)
