"""VID (variational information distillation): its loss by hand and the method; docs/methods/vid.md."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdistill import create_model
from kdistill.losses import VIDLoss
from kdistill.methods import Batch, StepInfo, build_method
from kdistill.step import Distiller


def _models(student: str = "cifar.resnet8", teacher: str = "cifar.resnet8") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return create_model(student, num_classes=10), create_model(teacher, num_classes=10)


def _batch(index: torch.Tensor | None, n: int = 4) -> Batch:
    return Batch(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)), index)


# --- VID ----------------------------------------------------------------------------------------


def test_vid_initial_variance_and_half_log_five() -> None:
    torch.manual_seed(0)
    loss = VIDLoss(8, 8)
    torch.testing.assert_close(loss.variance, torch.full((8,), 5.0))
    loss.regressor = nn.Identity()  # a regressor that outputs the target exactly
    target = torch.randn(2, 8, 4, 4)
    assert loss(target, target).item() == pytest.approx(0.5 * math.log(5), abs=1e-6)
    assert 0.5 * math.log(5) == pytest.approx(0.804719, abs=1e-6)


def test_vid_value_by_hand_and_pooling() -> None:
    loss = VIDLoss(2, 2)
    loss.regressor = nn.Identity()
    student = torch.zeros(1, 2, 4, 4)
    teacher = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)  # student pooled to 2×2
    expected = 0.5 * ((1 + 9) / 2 / 5.0 + math.log(5))
    assert loss(student, teacher).item() == pytest.approx(expected, abs=1e-5)


def test_vid_learn_variance_flag() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 4, 4)
    fixed = VIDLoss(4, 6, learn_variance=False)
    assert "alpha" in fixed.state_dict() and "alpha" not in dict(fixed.named_parameters())
    opt = torch.optim.SGD(fixed.parameters(), lr=1.0)
    fixed(student, teacher).backward()
    opt.step()
    torch.testing.assert_close(fixed.variance, torch.full((6,), 5.0))
    learned = VIDLoss(4, 6)
    opt = torch.optim.SGD(learned.parameters(), lr=1.0)
    learned(student, teacher).backward()
    assert learned.alpha.grad is not None
    opt.step()
    assert not torch.allclose(learned.variance, torch.full((6,), 5.0))


def test_vid_method_parameter_count_and_gradients() -> None:
    s, t = _models()  # stage widths 16/32/64 like resnet20/resnet56: 16,240 trainable parameters
    method = build_method("vid", student=s, teachers=[t])
    assert method.student_features == ["stage1", "stage2", "stage3"]
    assert sum(p.numel() for p in method.parameters()) == 16_240
    distiller = Distiller(s, [t], method).train()
    _, losses = distiller.forward_train(_batch(None), StepInfo())
    assert set(losses) == {"ce", "vid"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in method.parameters())
    assert all(stage.alpha.grad.abs().sum() > 0 for stage in method.stages)
    assert s.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in t.parameters())
    fixed = build_method("vid", student=s, teachers=[t], learn_variance=False)
    assert sum(p.numel() for p in fixed.parameters()) == 16_240 - (16 + 32 + 64)
