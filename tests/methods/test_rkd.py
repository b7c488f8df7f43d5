"""RKD (relational KD): invariances and the loss against explicit loops."""

from __future__ import annotations

import pytest
import torch

from kdistill.losses import rkd_loss

D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- RKD ------------------------------------------------------------------------------------------


def test_rkd_invariant_to_scale_and_translation():
    f = _rand(8, 12, seed=14)
    assert rkd_loss(3 * f, f).item() <= 1e-9
    assert rkd_loss(f + 5, f).item() <= 1e-9
    assert rkd_loss(_rand(8, 12, seed=15), f).item() > 1e-3


def _smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_matches_loops():
    s, t = _rand(4, 3, seed=16), _rand(4, 6, seed=17)
    B = 4

    def potentials(e):
        d = [[float((e[i] - e[j]).norm()) for j in range(B)] for i in range(B)]
        mu = sum(d[i][j] for i in range(B) for j in range(B) if i != j) / (B * (B - 1))
        dist = [d[i][j] / mu for i in range(B) for j in range(B)]
        angle = []
        for i in range(B):
            for j in range(B):
                for k in range(B):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = float(u.norm()), float(v.norm())
                    angle.append(0.0 if nu == 0 or nv == 0 else float(u @ v) / (nu * nv))
        return dist, angle

    (ds, as_), (dt, at_) = potentials(s), potentials(t)
    l_d = sum(_smooth_l1(a, b) for a, b in zip(ds, dt, strict=True)) / B**2
    l_a = sum(_smooth_l1(a, b) for a, b in zip(as_, at_, strict=True)) / B**3
    assert rkd_loss(s, t).item() == pytest.approx(25 * l_d + 50 * l_a, rel=1e-6)
    assert rkd_loss(s, t, 1.0, 0.0).item() == pytest.approx(l_d, rel=1e-6)
    assert rkd_loss(s, t, 0.0, 1.0).item() == pytest.approx(l_a, rel=1e-6)
