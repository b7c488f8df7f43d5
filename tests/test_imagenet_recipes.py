"""The ImageNet recipes: the imagenet transform, and teachers from named local weights files loaded strictly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from kdistill.checkpoint import CheckpointError
from kdistill.config import build_config, recipes_dir
from kdistill.engine.build import build_model
from kdistill.models import create_model

RECIPES = sorted(str(p.relative_to(recipes_dir()).with_suffix("")) for p in (recipes_dir() / "imagenet").rglob("*.yaml"))


def test_there_are_imagenet_recipes() -> None:
    assert {"imagenet/reviewkd/resnet34-resnet18", "imagenet/reviewkd/resnet50-mobilenet_v1",
            "imagenet/meal_v2/resnet50"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_streams_with_the_imagenet_transform_and_names_each_teacher_file(name: str) -> None:
    cfg = build_config(name)
    assert cfg.data.transform == "imagenet" and cfg.data.image_size == 224 and cfg.data.num_classes == 1000
    assert cfg.teachers
    for teacher in cfg.teachers:
        weights = teacher.checkpoint or teacher.pretrained
        assert weights, f"{name}: teacher {teacher.model} names no weights file"
        family = teacher.model.split(".")[0]
        # torchvision's own downloads are .pth state dicts, timm's hub files are safetensors
        assert Path(weights).suffix == {"torchvision": ".pth", "timm": ".safetensors"}[family]


def test_torchvision_teacher_file_loads_strictly_and_a_wrong_one_is_named(tmp_path: Path) -> None:
    cfg = build_config("imagenet/reviewkd/resnet34-resnet18")
    teacher = dataclasses.replace(cfg.teachers[0], pretrained=None)
    assert cfg.teachers[0].pretrained == "checkpoints/torchvision/resnet34-b627a593.pth"
    torch.manual_seed(1)
    state = create_model(teacher.model, num_classes=1000).state_dict()  # torchvision's own key names
    path = tmp_path / Path(cfg.teachers[0].pretrained).name
    torch.save(state, path)
    model = build_model(dataclasses.replace(teacher, checkpoint=str(path)), 1000, "teacher")
    assert torch.equal(model.state_dict()["layer4.2.bn2.running_var"], state["layer4.2.bn2.running_var"])
    del state["fc.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="fc.weight"):
        build_model(dataclasses.replace(teacher, checkpoint=str(path)), 1000, "teacher")
    resnet18 = create_model("torchvision.resnet18", num_classes=1000).state_dict()
    torch.save(resnet18, path)
    with pytest.raises(CheckpointError, match="layer1.2"):  # resnet18 weights for a resnet34: missing blocks named
        build_model(dataclasses.replace(teacher, checkpoint=str(path)), 1000, "teacher")
