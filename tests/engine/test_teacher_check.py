"""The teachers' validation accuracy before distilling: measured, cached per weights file, stored in the run,
and a warning for a teacher that is near chance or not above the student alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdistill.config import build_config
from kdistill.engine.build import build_run
from kdistill.engine.run import evaluate_model, fit
from kdistill.engine.teacher_check import TeacherScore, teacher_scores, weak_teacher_warnings
from kdistill.models import create_model

TINY = ["data.name=synthetic", "data.num_classes=4", "data.train_size=32", "data.val_size=24", "data.image_size=16",
        "data.batch_size=16", "data.eval_batch_size=16", "model=cifar.resnet8", "teacher.model=cifar.resnet8",
        "trainer.progress_bar=false", "method.name=kd", "trainer.max_epochs=1"]


@pytest.fixture()
def teacher_file(tmp_path: Path) -> Path:
    torch.manual_seed(5)
    path = tmp_path / "teacher.pth"
    torch.save(create_model("cifar.resnet8", num_classes=4).state_dict(), path)
    return path


def test_scores_are_measured_then_cached_per_weights_file(tmp_path: Path, teacher_file: Path) -> None:
    cfg = build_config(None, [*TINY, f"teacher.checkpoint={teacher_file}", f"output={tmp_path / 'run'}"])
    built = build_run(cfg)
    teacher = built.distiller.teachers[0]
    expected = evaluate_model(teacher, built.data.val, built.data.mean, built.data.std, 7)
    cache = tmp_path / "acc.json"
    first = teacher_scores(cfg, built.data, built.distiller.teachers, cache)
    assert (first[0].top1, first[0].top5, first[0].cached) == (expected["top1"], expected["top5"], False)
    assert first[0].top1 * 24 / 100 == pytest.approx(round(first[0].top1 * 24 / 100))  # k of 24 images
    again = teacher_scores(cfg, built.data, built.distiller.teachers, cache)
    assert (again[0].top1, again[0].cached) == (expected["top1"], True)
    assert len(json.loads(cache.read_text())) == 1
    torch.manual_seed(6)  # other weights in the same path: another hash, measured again
    torch.save(create_model("cifar.resnet8", num_classes=4).state_dict(), teacher_file)
    assert teacher_scores(cfg, built.data, build_run(cfg).distiller.teachers, cache)[0].cached is False
    assert len(json.loads(cache.read_text())) == 2


def test_warnings_near_chance_and_below_the_student_alone(tmp_path: Path) -> None:
    assert "near chance (10.00% for 10 classes)" in weak_teacher_warnings(
        [TeacherScore("t", 14.0, 50.0)], 10, tmp_path / "kd", "s")[0]
    assert weak_teacher_warnings([TeacherScore("t", 40.0, 80.0)], 10, tmp_path / "kd", "s") == []
    alone = tmp_path / "student"
    alone.mkdir()
    (alone / "config.json").write_text(json.dumps({"method": {"name": "ce"}, "student": {"model": "s"}}))
    (alone / "metrics.json").write_text(json.dumps({"top1_best": 45.0}))
    other = tmp_path / "other-student"  # another model alone does not count
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"method": {"name": "ce"}, "student": {"model": "x"}}))
    (other / "metrics.json").write_text(json.dumps({"top1_best": 90.0}))
    [warning] = weak_teacher_warnings([TeacherScore("t", 40.0, 80.0)], 10, tmp_path / "kd", "s")
    assert "not above the student alone (45.00% in" in warning and str(alone) in warning
    assert weak_teacher_warnings([TeacherScore("t", 46.0, 80.0)], 10, tmp_path / "kd", "s") == []


def test_fit_prints_and_stores_the_teachers_accuracy(tmp_path: Path, teacher_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = build_config(None, [*TINY, f"teacher.checkpoint={teacher_file}", f"output={tmp_path / 'run'}"])
    built = build_run(cfg)
    expected = evaluate_model(built.distiller.teachers[0], built.data.val, built.data.mean, built.data.std)
    fit(cfg, built=built)
    out, err = capsys.readouterr()
    assert f"teacher 0 cifar.resnet8: val top-1 {expected['top1']:.2f}%  top-5 {expected['top5']:.2f}%" in out
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())["teachers_val"]
    assert stored == [{"model": "cifar.resnet8", "top1": expected["top1"], "top5": expected["top5"]}]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["metrics"]["teachers_val"] == stored
    assert (expected["top1"] <= 37.5) == ("near chance" in err)


@pytest.mark.parametrize(("limit", "batches"), [("2", 2), ("0.5", 2), ("0.1", 1)])
def test_the_score_reads_the_batches_that_validation_reads(tmp_path: Path, teacher_file: Path, limit: str,
                                                           batches: int) -> None:
    # 24 val images in batches of 5: 5 batches; the first `batches` of them, scored by hand
    cfg = build_config(None, [*TINY, f"teacher.checkpoint={teacher_file}", f"output={tmp_path / 'run'}",
                              f"trainer.limit_val_batches={limit}", "data.eval_batch_size=5"])
    built = build_run(cfg)
    teacher = built.distiller.teachers[0].eval()
    images, targets = built.data.val.images[:5 * batches], built.data.val.targets[:5 * batches]
    mean = torch.tensor(built.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(built.data.std).view(1, 3, 1, 1)
    with torch.no_grad():
        predicted = teacher((images.float() / 255 - mean) / std).argmax(1)
    expected = 100 * (predicted == targets).sum().item() / len(targets)
    cache = tmp_path / "acc.json"
    score = teacher_scores(cfg, built.data, built.distiller.teachers, cache)[0]
    assert score.top1 == pytest.approx(expected, abs=1e-9)
    # a score on part of the split is cached apart from the whole split's
    whole = build_config(None, [*TINY, f"teacher.checkpoint={teacher_file}", f"output={tmp_path / 'run'}"])
    assert teacher_scores(whole, built.data, built.distiller.teachers, cache)[0].cached is False
    assert len(json.loads(cache.read_text())) == 2
