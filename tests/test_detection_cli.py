"""``kdistill train|distill|eval|export`` with ``task=detection`` on the synthetic shapes set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from kdistill.cli import main
from kdistill.detection.config import build_detection_config
from kdistill.utils import ConfigError

pytest.importorskip("pycocotools", reason="detection evaluation needs pycocotools (kdistill[detection])")

TINY = ["task=detection", "student.slim=true", "student.norm=batchnorm", "student.kwargs={min_size: 96, max_size: 96}",
        "data.train_size=4", "data.val_size=2", "data.image_size=[96, 96]", "trainer.progress_bar=false",
        "trainer.accelerator=cpu", "trainer.limit_train_batches=2"]


def test_train_resume_distill_eval_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    common = [*TINY, "model=fasterrcnn_resnet18_fpn", "trainer.log_every_n_steps=1"]
    assert main(["train", *common, "trainer.max_epochs=1", f"output={teacher_dir}"]) == 0
    first = torch.load(teacher_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 0 and first["global_step"] == 2
    assert main(["train", *common, "trainer.max_epochs=2", f"output={teacher_dir}", "--resume"]) == 0
    second = torch.load(teacher_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert second["epoch"] == 1 and second["global_step"] == 4
    # the resumed run appends to the log: the first epoch's rows are still there
    with open(teacher_dir / "logs" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted({int(r["epoch"]) for r in rows if r.get("val/bbox_AP")}) == [0, 1]
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss_step")) == [0, 1, 2, 3]
    # refused before anything is written: a new run into the run's folder, a resume under another learning rate,
    # a resume of a run that has trained its epochs
    kept = {p: p.read_bytes() for p in teacher_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", *common, "trainer.max_epochs=1", f"output={teacher_dir}"]) == 2
    assert "already holds a kdistill run" in capsys.readouterr().err
    assert main(["train", *common, "trainer.max_epochs=3", "optim.lr=0.5", f"output={teacher_dir}", "--resume"]) == 2
    assert "--resume: optim.lr is 0.5 but the run was trained with 0.01" in capsys.readouterr().err
    assert main(["train", *common, "trainer.max_epochs=2", f"output={teacher_dir}", "--resume"]) == 0
    assert "has already trained 2 epochs" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in teacher_dir.rglob("*") if p.is_file()} == kept
    card = json.loads((teacher_dir / "student.json").read_text())
    assert card["task"] == "detection" and card["num_classes"] == 4 and card["metrics"]["epochs"] == 2
    assert 0 <= card["metrics"]["bbox_AP"] <= 1

    assert main(["distill", *common, "method.name=reviewkd", "method.options.loss_weight=1.2",
                 "teacher.model=fasterrcnn_resnet18_fpn", "teacher.norm=batchnorm", "teacher.slim=true",
                 f"teacher.checkpoint={teacher_dir / 'student.safetensors'}", "trainer.max_epochs=1",
                 f"output={student_dir}"]) == 0
    logged = (student_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_reviewkd_epoch", "train/loss_classifier_epoch", "val/bbox_AP"} <= set(logged)
    state = torch.load(student_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("model.abfs.") for k in state) and not any("teacher" in k for k in state)
    capsys.readouterr()

    assert main(["eval", str(student_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) >= {"bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl"}
    # an override changes the run's own recipe: the reference scorer gives the same numbers
    assert main(["eval", str(student_dir), "eval_backend=pycocotools"]) == 0
    reference = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in reference.items() if k != "images_per_s"} == \
        {k: v for k, v in metrics.items() if k != "images_per_s"}
    assert main(["eval", str(student_dir), "eval_backend=cocoapi"]) == 2
    assert "eval_backend" in capsys.readouterr().err
    out = tmp_path / "export.safetensors"
    assert main(["export", str(student_dir / "checkpoints" / "last.ckpt"), "--out", str(out)]) == 0
    from kdistill.detection.engine import load_detector_from_run

    exported, _ = load_detector_from_run(out)
    trained, _ = load_detector_from_run(student_dir)
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), trained.state_dict().values(),
                                                 strict=True))
    before = out.read_bytes()
    assert main(["export", str(student_dir), "--out", str(out)]) == 2
    assert out.read_bytes() == before
    assert "never overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("overrides,message", [
    (["model=fasterrcnn_resnet7_fpn"], "unknown detector 'fasterrcnn_resnet7_fpn'"),
    (["model=fasterrcnn_resnet18_fpn", "data.name=voc"], "data.name"),
    (["model=fasterrcnn_resnet18_fpn", "method.name=reviewkd", "teacher.model=retinanet_resnet50_fpn"],
     "same detector family"),
    (["model=fasterrcnn_resnet18_fpn", "method.name=reviewkd", "teacher.model=fasterrcnn_resnet50_fpn",
      "method.options.lamda=1"], "method.options.lamda"),
    (["model=fasterrcnn_resnet18_fpn", "data.batch_sise=2"], "data.batch_sise"),
])
def test_bad_detection_recipes_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        build_detection_config(None, ["task=detection", *overrides])


def test_cli_exits_2_on_a_class_count_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from safetensors.torch import save_file

    from kdistill.detection import build_detector

    save_file(build_detector("fasterrcnn_resnet18_fpn", 9).state_dict(), str(tmp_path / "t.safetensors"))
    code = main(["distill", *TINY, "model=fasterrcnn_resnet18_fpn", "method.name=reviewkd",
                 "teacher.model=fasterrcnn_resnet18_fpn", f"teacher.checkpoint={tmp_path / 't.safetensors'}",
                 f"output={tmp_path / 'run'}"])
    assert code == 2
    assert "trained for 9 classes" in capsys.readouterr().err and not (tmp_path / "run" / "checkpoints").exists()


def test_every_coco_recipe_resolves_with_its_pair_and_published_numbers():
    from kdistill.detection import PAIRS
    from kdistill.recipes import list_recipes

    names = [name for name, _ in list_recipes() if name.startswith("coco/")]
    assert sorted(n.split("/")[-1] for n in names if "/reviewkd/" in n) == sorted(PAIRS)
    for name in names:
        cfg = build_detection_config(name)
        assert cfg.task == "detection" and cfg.data.name == "coco" and cfg.data.num_classes == 91
        assert "source" in cfg.published and cfg.student.backbone_weights
        if cfg.method.name == "reviewkd":
            pair = PAIRS[name.split("/")[-1]]
            assert (cfg.teacher.model, cfg.student.model) == (pair.teacher, pair.student)
            assert cfg.method.options["loss_weight"] == pair.loss_weight and cfg.teacher.checkpoint
    assert build_detection_config("coco/reviewkd/frcnn_r101_r18").published["box_ap"] == 36.75
    # no ReviewKD number is quoted for Mask R-CNN / RetinaNet (no checked copy): the teacher's and the baseline to compare
    for pair in ("maskrcnn_r101_r18", "maskrcnn_r101_r50", "maskrcnn_r50_mv2", "retinanet_r101_r50"):
        published = build_detection_config(f"coco/reviewkd/{pair}").published
        assert published["box_ap"] is None and published["teacher_box_ap"] > 35 and "coco/vanilla/" in published["source"]
        assert ("teacher_mask_ap" in published) == pair.startswith("maskrcnn")


def test_readme_detection_example_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Detection and instance segmentation"):]
    code = section[section.index("```python") + len("```python"): section.index("```", section.index("```python") + 9)]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    losses, teacher = namespace["losses"], namespace["teacher"]
    assert {"loss_mask", "loss_reviewkd"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
