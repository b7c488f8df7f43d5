"""PKT (probabilistic knowledge transfer): the loss against explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.losses import pkt_loss

D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- PKT ------------------------------------------------------------------------------------------


def test_pkt_identical_is_zero_and_matches_loops():
    f = _rand(6, 16, seed=11)
    assert pkt_loss(f, f).item() == pytest.approx(0.0, abs=1e-12)
    s, t = _rand(4, 5, seed=12), _rand(4, 9, seed=13)
    eps, B = 1e-7, 4

    def q(x):
        unit = [x[i] / (x[i].norm() + eps) for i in range(B)]
        sim = [[(float(unit[i] @ unit[j]) + 1) / 2 for j in range(B)] for i in range(B)]
        return [[sim[i][j] / sum(sim[i]) for j in range(B)] for i in range(B)]

    qs, qt = q(s), q(t)
    ref = sum(qt[i][j] * math.log((qt[i][j] + eps) / (qs[i][j] + eps)) for i in range(B) for j in range(B)) / B**2
    assert pkt_loss(s, t).item() == pytest.approx(ref, rel=1e-9)
    assert ref > 0
