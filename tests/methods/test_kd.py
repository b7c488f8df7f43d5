"""KD loss by hand (docs/methods/kd.md) and the KD method's loss assembly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kdistill
from kdistill.losses import kd_loss
from kdistill.methods import Batch, ModelOutput, StepInfo


def test_kd_loss_hand_values() -> None:
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    assert kd_loss(s, t, 1.0).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(0.130812, abs=1e-5)
    assert kd_loss(s, t, 4.0).item() == pytest.approx(0.149457, abs=1e-5)


def test_kd_loss_matches_torch_kl_div_batch_mean() -> None:
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    ref = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    assert kd_loss(s, t, 2.0).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kd_loss_gradient_only_to_student() -> None:
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    kd_loss(s, t, 4.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_loss_rejects_bad_temperature() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


def test_kd_method_weights_and_ensemble_target() -> None:
    student = kdistill.create_model("cifar.resnet8", num_classes=3)
    method = kdistill.build_method("kd", student=student, teachers=[student, student], temperature=2.0,
                                   ce_weight=0.5, kd_weight=2.0)
    s = torch.tensor([[0.0, 1.0, 0.0]])
    t1, t2 = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.0]])
    y = torch.tensor([1])
    losses = method(Batch(torch.zeros(1), y), ModelOutput(s), [ModelOutput(t1), ModelOutput(t2)], StepInfo())
    assert losses["ce"].item() == pytest.approx(0.5 * F.cross_entropy(s, y).item(), rel=1e-6)
    # independent route: KL(mean of softened teacher probabilities ‖ softened student) · T² · weight
    p = (F.softmax(t1 / 2, 1) + F.softmax(t2 / 2, 1)) / 2
    q = F.softmax(s / 2, 1)
    expected = 2.0 * 4 * (p * (p / q).log()).sum().item()
    assert losses["kd"].item() == pytest.approx(expected, rel=1e-5)


def test_build_method_unknown_name_and_option() -> None:
    s = kdistill.create_model("cifar.resnet8", num_classes=3)
    with pytest.raises(ValueError, match=r"unknown method 'kdd'.*Did you mean 'kd'"):
        kdistill.build_method("kdd", student=s, teachers=[s])
    with pytest.raises(ValueError, match=r"unknown option of method 'kd' 'temprature'.*'temperature'"):
        kdistill.build_method("kd", student=s, teachers=[s], temprature=3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        kdistill.build_method("kd", student=s, teachers=[s], temperature=-1)
    with pytest.raises(ValueError, match="kd_weight must be a finite number >= 0"):
        kdistill.build_method("kd", student=s, teachers=[s], kd_weight=-0.5)
