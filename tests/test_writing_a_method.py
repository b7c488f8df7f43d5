"""docs/writing-a-method.md: its example (a new logit method as one file plus its loss function) runs
as written, registers, trains, validates its options through the configuration, and its loss
matches a value computed by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import kdistill
from kdistill.config import build_config
from kdistill.methods import Batch, StepInfo, base
from kdistill.utils import ConfigError

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-a-method.md"


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The loss and method blocks executed in one namespace, registered in a copy of the registry."""
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    loss_block, method_block, _ = code_blocks()
    namespace: dict = {}
    exec(compile(loss_block, f"{DOC}:loss", "exec"), namespace)
    exec(compile(method_block, f"{DOC}:method", "exec"), namespace)
    return namespace


def test_the_doc_has_the_three_blocks() -> None:
    blocks = code_blocks()
    assert len(blocks) == 3
    assert "def logit_mse_loss" in blocks[0] and "@register_method" in blocks[1] and "train_step" in blocks[2]


def test_loss_by_hand(example: dict) -> None:
    s = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0, 2.0], [1.0, 1.0, 1.0]])
    # rows: ½(1 + 0 + 4) = 2.5 and ½(1 + 1 + 1) = 1.5; mean 2.0
    assert example["logit_mse_loss"](s, t).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="equal shapes"):
        example["logit_mse_loss"](s, t[:, :2])


def test_the_example_registers_trains_and_is_validated(example: dict) -> None:
    assert "logit_mse" in kdistill.list_methods()
    assert kdistill.methods.method_options("logit_mse") == {"mse_weight": 1.0, "ce_weight": 0.0}
    torch.manual_seed(0)
    student = kdistill.create_model("cifar.resnet8", num_classes=5)
    teacher = kdistill.create_model("cifar.resnet8", num_classes=5)
    batch = Batch(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    info = StepInfo()
    with torch.no_grad():
        z_s, z_t = student.train()(batch.images), teacher.eval()(batch.images)
    expected_mse = 0.5 * (z_s - z_t).pow(2).sum(1).mean().item()
    expected_ce = 0.1 * torch.nn.functional.cross_entropy(z_s, batch.targets).item()

    namespace = {"torch": torch, "student": student, "teacher": teacher, "batch": batch, "info": info}
    exec(compile(code_blocks()[2], f"{DOC}:usage", "exec"), namespace)
    losses = namespace["losses"]
    assert set(losses) == {"mse", "ce"}
    assert losses["mse"] == pytest.approx(expected_mse, rel=1e-5)
    assert losses["ce"] == pytest.approx(expected_ce, rel=1e-5)
    # the step updated the student
    with torch.no_grad():
        assert not torch.equal(student(batch.images), z_s)

    cfg = build_config(None, ["method.name=logit_mse", "method.options.ce_weight=0.1", "teacher.model=cifar.resnet8"])
    assert cfg.method.options == {"ce_weight": 0.1}
    with pytest.raises(ConfigError, match=r"method.options.mse_weight: expected a number, got 'abc'"):
        build_config(None, ["method.name=logit_mse", "method.options.mse_weight=abc"])
    with pytest.raises(ConfigError, match="mse_weight must be a finite number >= 0"):
        build_config(None, ["method.name=logit_mse", "method.options.mse_weight=-1"])
    with pytest.raises(ConfigError, match="needs exactly one teacher"):
        kdistill.build_method("logit_mse", student=student, teachers=[teacher, teacher])
