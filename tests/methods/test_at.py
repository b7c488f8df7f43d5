"""AT (attention transfer): the loss by hand and against explicit loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import at_loss

D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- AT -------------------------------------------------------------------------------------------


def test_at_hand_values():
    s = torch.zeros(1, 3, 2, 2)
    s[:, :, 0, 0] = 1.0  # a(s) = [1, 0, 0, 0]; a(t) = [.5, .5, .5, .5]
    assert at_loss(s, torch.ones(1, 5, 2, 2)).item() == pytest.approx(0.25, abs=1e-5)
    # 4×4 constant vs 2×2 constant, different channel counts: pooled, identical attention
    assert at_loss(torch.full((2, 3, 4, 4), 2.0), torch.ones(2, 7, 2, 2)).item() == pytest.approx(0.0, abs=1e-7)


def _at_loops(s, t, p=2):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        a_s = (s[b] ** p).sum(0).flatten() / s.shape[1]
        a_t = (t[b] ** p).sum(0).flatten() / t.shape[1]
        a_s, a_t = a_s / a_s.norm(), a_t / a_t.norm()
        total += ((a_s - a_t) ** 2).sum().item()
        count += a_s.numel()
    return total / count


def test_at_matches_loops_with_fixed_kernel_pooling():
    s, t = _rand(3, 4, 8, 8, seed=5), _rand(3, 6, 4, 4, seed=6)
    assert at_loss(s, t).item() == pytest.approx(_at_loops(F.avg_pool2d(s, 2), t), rel=1e-9)
    # rectangular maps pool per axis to (min H, min W) (the reference assumes square maps): 8×6 vs 4×6 → kernel (2, 1)
    s2, t2 = _rand(2, 3, 8, 6, seed=7), _rand(2, 5, 4, 6, seed=8)
    assert at_loss(s2, t2).item() == pytest.approx(_at_loops(F.avg_pool2d(s2, (2, 1)), t2), rel=1e-9)
    assert at_loss(t2, s2).item() == pytest.approx(_at_loops(t2, F.avg_pool2d(s2, (2, 1))), rel=1e-9)
    assert at_loss(s, t, p=4).item() == pytest.approx(_at_loops(F.avg_pool2d(s, 2), t, p=4), rel=1e-9)
