"""Learning-rate schedules as per-iteration multipliers: linear warm-up, then multistep or cosine.

Milestones are in epochs, matching recipes such as "×0.1 when epoch > 150, 180, 210"
(the CIFAR-100 benchmark, docs/recipes.md): the factor changes at the first iteration of epoch 150 (0-indexed).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable


def lr_factor(
    schedule: str,
    steps_per_epoch: int,
    max_epochs: int,
    milestones: list[int] | None = None,
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
    min_factor: float = 0.0,
) -> Callable[[int], float]:
    """A function of the global step returning the learning-rate multiplier."""
    milestones = sorted(milestones or [])
    total = max(1, steps_per_epoch * max_epochs)
    warmup = int(round(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "multistep":
            return gamma ** bisect_right(milestones, step // max(1, steps_per_epoch))
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "constant":
            return 1.0
        raise ValueError(f"unknown schedule {schedule!r}; allowed: multistep, cosine, constant")

    return factor
