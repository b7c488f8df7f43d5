"""A NaN/Inf names the first non-finite tensor and its likely cause (kdistill.engine.nonfinite)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kdistill.cli import main
from kdistill.data import BatchAugment
from kdistill.engine.nonfinite import diagnose
from kdistill.methods import build_method
from kdistill.models import create_model
from kdistill.step import Distiller

COMMON = ["model=cifar.resnet8", "data.batch_size=8", "data.eval_batch_size=8", "trainer.max_epochs=1",
          "trainer.progress_bar=false"]


def test_constant_images_name_the_input_batch_and_zero_std(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "imgs" / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (128, 128, 128)).save(tmp_path / "imgs" / split / f"c{c}" / f"{i}.png")
    code = main(["train", *COMMON, "data.name=imagefolder", f"data.root={tmp_path / 'imgs'}",
                 f"data.cache_dir={tmp_path / 'cache'}", f"output={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err
    assert "the input batch is non-finite: the normalisation std is 0 for channel(s) [0, 1, 2]" in err, err


def test_teacher_with_nan_weights_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    teacher = create_model("cifar.resnet8", num_classes=4)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    state["fc.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "t.safetensors"))
    code = main(["distill", *COMMON, "method.name=kd", "teacher.model=cifar.resnet8",
                 f"teacher.checkpoint={tmp_path / 't.safetensors'}", "data.num_classes=4", "data.train_size=16",
                 "data.val_size=8", "data.image_size=16", f"output={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 3 and "Traceback" not in err
    assert "teacher 0's output is non-finite: its weights hold NaN or Inf (fc.weight)" in err, err


def _pair() -> tuple[Distiller, torch.Tensor, BatchAugment]:
    torch.manual_seed(0)
    student, teacher = create_model("cifar.resnet8", num_classes=3), create_model("cifar.resnet8", num_classes=3)
    method = build_method("kd", student=student, teachers=[teacher], input_size=(3, 8, 8))
    aug = BatchAugment([0.5] * 3, [0.25] * 3)
    return Distiller(student, [teacher], method), torch.randn(2, 3, 8, 8), aug


def test_student_divergence_and_loss_term() -> None:
    distiller, images, aug = _pair()
    finite = {"kd": torch.tensor(1.0), "ce": torch.tensor(float("inf"))}
    assert "loss term 'ce' is not" in diagnose(distiller, images, aug, finite)
    with torch.no_grad():
        distiller.student.conv1.weight[0, 0, 0, 0] = float("nan")
    message = diagnose(distiller, images, aug, finite)
    assert message.startswith("the student's output is non-finite: its weights became NaN or Inf"), message
    bad_input = images.clone()
    bad_input[0, 0, 0, 0] = float("inf")
    assert "the input batch is non-finite: the images or the normalisation" in diagnose(distiller, bad_input, aug,
                                                                                          finite)
