"""One plain line per epoch, the history in percent with its loss terms, the best checkpoint named after
the history's epoch, and class-balanced validation subsets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kdistill.config import build_config
from kdistill.data import ImageTensors
from kdistill.engine.build import balanced_subset, load_data
from kdistill.engine.run import fit
from kdistill.utils import ConfigError

TINY = ["data.name=synthetic", "data.num_classes=4", "data.train_size=48", "data.val_size=32", "data.image_size=16",
        "data.batch_size=16", "data.eval_batch_size=16", "model=cifar.resnet8", "teacher.model=cifar.resnet8",
        "teacher.allow_untrained=true", "teacher.evaluate=false", "method.name=kd", "trainer.max_epochs=3",
        "optim.schedule=cosine", "optim.lr=0.1"]
LINE = re.compile(r"^epoch (\d)/3  loss (\S+) \(ce (\S+), kd (\S+)\)  val top-1 (\d+\.\d\d)%  top-5 (\d+\.\d\d)%  "
                  r"\d+ img/s  \d+\.\ds  left \d+s$")


@pytest.mark.parametrize("progress_bar", ["false", "true"])
def test_one_line_per_epoch_and_consistent_history(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   progress_bar: str) -> None:
    out = tmp_path / "run"
    fit(build_config(None, [*TINY, f"trainer.progress_bar={progress_bar}", f"output={out}"]))
    lines = [m for m in map(LINE.match, capsys.readouterr().out.splitlines()) if m]
    assert [m.group(1) for m in lines] == ["1", "2", "3"]
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["history"]
    for m, row in zip(lines, history, strict=True):
        assert float(m.group(5)) == pytest.approx(row["val_top1"], abs=0.005)  # percent in both
        assert float(m.group(2)) == pytest.approx(row["train_loss"], rel=1e-3)
        assert row["train_loss"] == pytest.approx(row["train_ce"] + row["train_kd"], rel=1e-5)  # the terms sum up
    assert metrics["top1_last"] == pytest.approx(history[-1]["val_top1"])
    best_epoch = max(history, key=lambda r: r["val_top1"])["epoch"]  # first of equal maxima, as the checkpoint keeps
    assert [p.name for p in (out / "checkpoints").glob("best-*.ckpt")] == [f"best-epoch{best_epoch:03d}.ckpt"]
    assert torch.load(out / "checkpoints" / f"best-epoch{best_epoch:03d}.ckpt", weights_only=True)["epoch"] == best_epoch - 1


def test_balanced_validation_subset() -> None:
    targets = torch.tensor([0] * 6 + [1] * 2 + [2] * 5)  # sorted by class, as image folders are
    split = ImageTensors(torch.arange(13, dtype=torch.uint8).view(13, 1, 1, 1).expand(13, 3, 2, 2).contiguous(), targets)
    sub = balanced_subset(split, 3, seed=0)
    assert torch.bincount(sub.targets).tolist() == [3, 2, 3]
    assert (sub.images[sub.targets == 0][:, 0, 0, 0] < 6).all()  # images travel with their labels
    assert torch.equal(sub.targets, sub.targets.sort().values)
    assert torch.equal(balanced_subset(split, 3, seed=0).images, sub.images)  # chosen by the seed


def test_val_per_class_in_a_run() -> None:
    data = load_data(build_config(None, [*TINY, "data.val_per_class=5"]))
    assert torch.bincount(data.val.targets).tolist() == [5, 5, 5, 5]
    with pytest.raises(ConfigError, match=r"data.val_per_class must be an integer in \[1, .*\], got 0"):
        build_config(None, [*TINY, "data.val_per_class=0"])
