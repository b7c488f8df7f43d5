"""NST (neuron selectivity transfer): the loss against the spatial Gram formulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import nst_loss

D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- NST ------------------------------------------------------------------------------------------


def test_nst_identical_is_zero_and_channels_may_differ():
    f = _rand(2, 4, 4, 4, seed=18)
    assert nst_loss(f, f).item() == pytest.approx(0.0, abs=1e-12)
    assert nst_loss(_rand(2, 3, 8, 8, seed=19), f).item() > 0


def test_nst_matches_spatial_gram_formulation():
    """mean k(s,s) + mean k(t,t) − 2 mean k(s,t) = mean_b ‖SᵀS/C_s − TᵀT/C_t‖²_F (HW×HW Grams)."""
    s, t = _rand(3, 5, 8, 8, seed=20), _rand(3, 7, 4, 4, seed=21)
    sp_ = F.normalize(F.avg_pool2d(s, 2).flatten(2), dim=2)  # B×C×N
    tp = F.normalize(t.flatten(2), dim=2)
    gram_s = sp_.transpose(1, 2) @ sp_ / sp_.shape[1]
    gram_t = tp.transpose(1, 2) @ tp / tp.shape[1]
    ref = ((gram_s - gram_t) ** 2).sum(dim=(1, 2)).mean()
    assert nst_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-9)
