"""Pretrained weights from a local file (torchvision / timm key format, 1000 classes) on a new class count,
and the refusal of untrained teachers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdistill.checkpoint import CheckpointError, load_pretrained
from kdistill.config import build_config
from kdistill.engine.build import build_run
from kdistill.models import create_model
from kdistill.utils import ConfigError

TINY = ["data.name=synthetic", "data.num_classes=4", "data.train_size=16", "data.val_size=8", "data.image_size=32"]


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's mobilenet_v3_small at 1000 classes, randomly initialised, saved as torchvision saves it."""
    import torchvision

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small-imagenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=1000).state_dict(), path)
    return path


def test_torchvision_new_class_count_keeps_features_and_replaces_classifier(mobilenet_file: Path) -> None:
    torch.manual_seed(2)
    model = create_model("torchvision.mobilenet_v3_small", num_classes=10)
    fresh_head = model.classifier[3].weight.detach().clone()
    replaced = load_pretrained(model, mobilenet_file)
    assert replaced == ["classifier.3.bias", "classifier.3.weight"]
    saved = torch.load(mobilenet_file, weights_only=True)
    own = model.state_dict()
    for key, value in saved.items():
        if key not in replaced:
            assert torch.equal(own[key], value), key
    assert own["classifier.3.weight"].shape == (10, 1024)
    assert torch.equal(own["classifier.3.weight"], fresh_head)  # the new head keeps its own initialisation


def test_same_class_count_loads_everything(mobilenet_file: Path) -> None:
    model = create_model("torchvision.mobilenet_v3_small", num_classes=1000)
    assert load_pretrained(model, mobilenet_file) == []
    assert torch.equal(model.classifier[3].weight, torch.load(mobilenet_file, weights_only=True)["classifier.3.weight"])


def test_timm_new_class_count(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    path = tmp_path / "test_resnet.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("test_resnet", num_classes=1000).state_dict(), str(path))
    model = create_model("timm.test_resnet", num_classes=7)
    assert load_pretrained(model, path) == ["fc.bias", "fc.weight"]
    assert model.get_classifier().out_features == 7


def test_another_networks_file_is_refused(mobilenet_file: Path) -> None:
    model = create_model("torchvision.resnet18", num_classes=10)
    with pytest.raises(CheckpointError, match="only the classifier may differ") as err:
        load_pretrained(model, mobilenet_file)
    assert "missing" in str(err.value) and "unexpected" in str(err.value)


def test_student_and_teacher_pretrained_in_a_run(mobilenet_file: Path) -> None:
    cfg = build_config(None, [*TINY, "method.name=kd", "student.model=torchvision.mobilenet_v3_small",
                              f"student.pretrained={mobilenet_file}", "teacher.model=torchvision.mobilenet_v3_small",
                              f"teacher.pretrained={mobilenet_file}"])
    with pytest.raises(ConfigError, match="Fine-tune it first") as err:
        build_run(cfg)
    assert "teachers.0.pretrained" in str(err.value)
    cfg.teacher.allow_untrained = True
    built = build_run(cfg)
    saved = torch.load(mobilenet_file, weights_only=True)
    for net in (built.distiller.student, built.distiller.teachers[0]):
        assert torch.equal(net.state_dict()["features.0.0.weight"], saved["features.0.0.weight"])
        assert net.classifier[3].out_features == 4


def test_untrained_teacher_is_an_error_unless_allowed() -> None:
    cfg = build_config(None, [*TINY, "method.name=kd", "student.model=cifar.resnet8", "teacher.model=cifar.resnet8"])
    with pytest.raises(ConfigError, match=r"teachers\.0 \(cifar\.resnet8\) has no trained weights") as err:
        build_run(cfg)
    assert "teacher.allow_untrained=true" in str(err.value)
    cfg.teacher.allow_untrained = True
    assert len(build_run(cfg).distiller.teachers) == 1


def test_download_kwargs_point_to_pretrained() -> None:
    with pytest.raises(ConfigError, match=r"student\.kwargs\.weights: weights are not downloaded.*student\.pretrained"):
        build_config(None, [*TINY, "student.model=torchvision.resnet18", "student.kwargs={weights: IMAGENET1K_V1}"])
    with pytest.raises(ConfigError, match=r"teachers\.0\.kwargs\.pretrained: weights are not downloaded"):
        build_config(None, [*TINY, "teacher.model=timm.test_resnet", "teacher.kwargs={pretrained: true}"])
