"""Deep mutual learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdistill.losses._common import float32_loss
from kdistill.losses.kd import kd_loss


@float32_loss
def mutual_kl(logits: Sequence[Tensor], temperature: float = 1.0) -> Tensor:
    """Each network's mimicry term of DML (paper eq. 10): ``1/(K-1) Σ_{l≠k} T²·KL(sg p_l ‖ p_k)``.

    Returns a tensor of K entries, one per network. The peers are detached, so one backward of
    the sum gives every network exactly the gradient of its own objective (the simultaneous
    update of all peers on one batch).
    """
    if len(logits) < 2:
        raise ValueError(f"mutual learning needs at least 2 networks, got {len(logits)}")
    k = len(logits)
    terms = [
        sum(kd_loss(logits[i], logits[j], temperature) for j in range(k) if j != i) / (k - 1) for i in range(k)
    ]
    return torch.stack(terms)
