"""Online ensemble model compression (Walawalkar, Shen & Savvides, ECCV 2020).

N students of decreasing width share a common base; student 1 (full width) is the
pseudo-teacher. Each student learns from the labels, from the detached ensemble of all students'
logits, and (students 2..N) mimics the pseudo-teacher's detached stage outputs through a 1×1
convolution adapter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses._common import float32_loss, upcast
from kdistill.losses.kd import kd_loss


def oekd_widths(widths: Sequence[int], num_students: int, num_blocks: int | None = None) -> list[list[int]]:
    """Stage widths of every student: student ``j`` (1-based) keeps ``w·(N-j+1)//N`` channels.

    Only the last ``num_blocks`` stages are narrowed (all of them by default), as in the paper's
    compression schedule; student 1 keeps the original widths.
    """
    n = int(num_students)
    if n < 1:
        raise ValueError(f"num_students must be >= 1, got {num_students}")
    blocks = len(widths) if num_blocks is None else int(num_blocks)
    if not 1 <= blocks <= len(widths):
        raise ValueError(f"num_blocks must be in [1, {len(widths)}], got {num_blocks}")
    first_scaled = len(widths) - blocks
    out = []
    for j in range(1, n + 1):
        scaled = [w if s < first_scaled else max(1, w * (n - j + 1) // n) for s, w in enumerate(widths)]
        out.append(scaled)
    return out


def ensemble_logits(logits: Sequence[Tensor], weights: Tensor | None = None) -> Tensor:
    """The ensemble teacher ``z_E = Σ_j w_j z_j``; uniform ``w_j = 1/N`` when ``weights`` is None."""
    stacked = torch.stack([upcast(z) for z in logits])
    if weights is None:
        return stacked.mean(0)
    if weights.shape != (stacked.shape[0],):
        raise ValueError(f"weights must have {stacked.shape[0]} entries, got shape {tuple(weights.shape)}")
    return torch.einsum("n,nbc->bc", weights.to(stacked.dtype), stacked)


@float32_loss
def oekd_loss(
    logits: Sequence[Tensor],
    targets: Tensor,
    features: Sequence[Sequence[Tensor]] = (),
    adapters: Sequence[Sequence[nn.Module]] = (),
    alpha: float = 0.7,
    beta: float = 0.15,
    gamma: float = 0.15,
    temperature: float = 2.0,
    weights: Tensor | None = None,
) -> dict[str, Tensor]:
    """The three weighted terms of the paper's combined loss.

    ``ce = α Σ_j CE(z_j, y)``; ``feature = β Σ_k Σ_{j≥2} MSE(sg F¹_k, Ad_jk(F^j_k))`` (element mean);
    ``kd = γ Σ_j T²·KL(sg p(z_E) ‖ p(z_j))``. ``features[j][k]`` is student j's stage-k map
    (0-based j; ``features[0]`` the pseudo-teacher), ``adapters[j-1][k]`` maps student j's channels to
    the pseudo-teacher's. Without features the feature term is omitted.
    """
    ensemble = ensemble_logits(logits, weights).detach()
    losses = {
        "ce": alpha * sum(F.cross_entropy(upcast(z), targets) for z in logits),
        "kd": gamma * sum(kd_loss(z, ensemble, temperature) for z in logits),
    }
    if features:
        if len(features) != len(logits) or len(adapters) != len(logits) - 1:
            raise ValueError(
                f"need features of all {len(logits)} students and adapters of the {len(logits) - 1} non-pseudo-teachers, "
                f"got {len(features)} and {len(adapters)}"
            )
        terms = []
        for stage, target in enumerate(features[0]):
            for j in range(1, len(logits)):
                adapted = adapters[j - 1][stage](upcast(features[j][stage]))  # in float32, as the whole loss
                terms.append(F.mse_loss(adapted, upcast(target.detach())))
        losses["feature"] = beta * torch.stack(terms).sum()
    return losses
