"""SP (similarity-preserving KD): the loss by hand and against explicit loops."""

from __future__ import annotations

import math

import pytest
import torch

from kdistill.losses import sp_loss

D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- SP -------------------------------------------------------------------------------------------


def test_sp_hand_value():
    fs, ft = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp_loss(fs, ft).item() == pytest.approx((2 - math.sqrt(2)) / 2, abs=1e-5)
    assert (2 - math.sqrt(2)) / 2 == pytest.approx(0.292893, abs=1e-6)


def test_sp_matches_loops():
    s, t = _rand(5, 3, 4, 4, seed=9), _rand(5, 8, 2, 2, seed=10)
    B = 5
    fs, ft = s.reshape(B, -1), t.reshape(B, -1)
    total = 0.0
    for i in range(B):
        gs = torch.tensor([float(fs[i] @ fs[j]) for j in range(B)], dtype=D)
        gt = torch.tensor([float(ft[i] @ ft[j]) for j in range(B)], dtype=D)
        total += ((gt / gt.norm() - gs / gs.norm()) ** 2).sum().item()
    assert sp_loss(s, t).item() == pytest.approx(total / B**2, rel=1e-9)
