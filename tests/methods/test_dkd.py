"""DKD (decoupled KD): the loss against values computed by hand and a probability-space formulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import dkd_loss, kd_loss

D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- DKD ------------------------------------------------------------------------------------------


def test_dkd_hand_values_and_kd_identity():
    zs, y = torch.zeros(1, 3), torch.tensor([0])
    t1 = torch.tensor([[math.log(2), 0.0, 0.0]])  # p_t = [.5, .25, .25]: NCKD = 0
    tckd = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    assert dkd_loss(zs, t1, y, alpha=1, beta=8, temperature=1).item() == pytest.approx(tckd, abs=1e-5)
    assert tckd == pytest.approx(0.058892, abs=1e-6)
    assert kd_loss(zs, t1, 1).item() == pytest.approx(0.058892, abs=1e-5)

    t2 = torch.tensor([[math.log(2), math.log(3), 0.0]])  # p_t = [1/3, 1/2, 1/6]: TCKD = 0
    assert dkd_loss(zs, t2, y, alpha=1, beta=1, temperature=1).item() == pytest.approx(0.130812, abs=1e-5)
    assert dkd_loss(zs, t2, y, alpha=1, beta=0, temperature=1).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(zs, t2, 1).item() == pytest.approx(0.087208, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd(temperature):
    """KD = TCKD + (1 − p^t_y)·NCKD per sample, at the same T (DKD paper), on random logits."""
    s, t = _rand(5, 7, seed=1) * 3, _rand(5, 7, seed=2) * 3
    y = torch.tensor([0, 3, 6, 2, 2])
    for b in range(5):
        sb, tb, yb = s[b : b + 1], t[b : b + 1], y[b : b + 1]
        pt_y = F.softmax(tb / temperature, 1)[0, yb].item()
        tckd = dkd_loss(sb, tb, yb, alpha=1, beta=0, temperature=temperature)
        nckd = dkd_loss(sb, tb, yb, alpha=0, beta=1, temperature=temperature)
        kd = kd_loss(sb.float(), tb.float(), temperature).double()
        assert (tckd + (1 - pt_y) * nckd).item() == pytest.approx(kd.item(), rel=1e-5)
        # the same through alpha/beta in one call
        both = dkd_loss(sb, tb, yb, alpha=1, beta=1 - pt_y, temperature=temperature)
        assert both.item() == pytest.approx(kd.item(), rel=1e-5)


def _dkd_probability_space(s, t, y, alpha, beta, T):
    """The reference's formulation: probabilities, a −1000 target mask, log of the binary split."""
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * T**2
    log_ps_hat = F.log_softmax(s / T - 1000.0 * gt, 1)
    pt_hat = F.softmax(t / T - 1000.0 * gt, 1)
    nckd = (pt_hat * (pt_hat.clamp_min(1e-300).log() - log_ps_hat)).sum(1).mean() * T**2
    return alpha * tckd + beta * nckd


def test_dkd_matches_probability_space_formulation():
    s, t = _rand(6, 10, seed=3), _rand(6, 10, seed=4) * 2
    y = torch.tensor([0, 1, 9, 4, 4, 7])
    for alpha, beta, T in [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)]:
        ref = _dkd_probability_space(s, t, y, alpha, beta, T)
        assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(ref.item(), rel=1e-9)


def test_dkd_log_space_does_not_underflow():
    """A student target probability e^-200 underflows float32; log space stays exact (the reference's −1000 mask does not)."""
    s = torch.tensor([[-200.0, 0.0, 0.0]], requires_grad=True)
    t = torch.zeros(1, 3)
    loss = dkd_loss(s, t, torch.tensor([0]), alpha=1, beta=1, temperature=1)
    # TCKD = 1/3·(ln 1/3 + 200 + ln 2) + 2/3·ln(2/3); NCKD = 0 (both uniform over non-targets)
    assert loss.item() == pytest.approx(200 / 3 + math.log(2 / 3), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_dkd_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), temperature=0)
    with pytest.raises(ValueError, match="equal shape"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]))
