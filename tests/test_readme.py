"""The README's walk-through, executed on a small generated image folder with a locally saved
pretrained-format weights file (torchvision's resnet18 keys, randomly initialised: nothing is downloaded)."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from kdistill.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def walk_through() -> list[str]:
    """The commands of the block after ``<!-- walk-through -->``, continuation lines joined."""
    text = README.read_text().split("<!-- walk-through -->", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def test_readme_walk_through(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "cache"))
    make_image_folder(tmp_path / "my_images", ext="jpg")
    commands = walk_through()
    assert commands[0].startswith("python -c") and "resnet18(weights='IMAGENET1K_V1').state_dict(), 'resnet18.pth'" in commands[0]
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), "resnet18.pth")  # the same format, offline
    outputs = {}
    for command in commands[1:]:
        argv = shlex.split(command)
        assert argv[0] == "kdistill"
        argv = [re.sub(r"^trainer\.max_epochs=\d+$", "trainer.max_epochs=1",
                       re.sub(r"^data\.image_size=\d+$", "data.image_size=16", a)) for a in argv[1:]]
        argv = [path for a in argv for path in (sorted(glob.glob(a)) if "*" in a else [a])]
        if argv[0] in ("train", "distill"):
            argv += ["trainer.progress_bar=false", "data.batch_size=8"]
        capsys.readouterr()
        assert main(argv) == 0, command
        outputs[argv[0]] = capsys.readouterr().out
    teacher_cfg = json.loads(Path("runs/teacher/config.json").read_text())
    assert teacher_cfg["student"]["pretrained"] == "resnet18.pth" and teacher_cfg["data"]["num_classes"] == 3
    kd = json.loads(Path("runs/kd/metrics.json").read_text())
    assert kd["teachers_val"][0]["model"] == "torchvision.resnet18"
    table = outputs["compare"].splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["runs/teacher", "runs/student", "runs/kd"]
    assert Path("runs/compare.png").stat().st_size > 1000
    predictions = outputs["predict"].splitlines()
    assert len(predictions) == 12 and all(line.split()[1].startswith("class_") for line in predictions)
    assert Path("kd.onnx").stat().st_size > 10_000 and json.loads(Path("kd.json").read_text())["onnx"]["input"]["dtype"] == "uint8"


def test_readme_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "From Python" block as written, with a CIFAR teacher file in the shared layout (random weights)."""
    import kdistill

    block = README.read_text().split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    Path("resnet56_vanilla").mkdir()
    torch.save({"model": kdistill.create_model("cifar.resnet56", num_classes=100).state_dict()},
               "resnet56_vanilla/ckpt_epoch_240.pth")
    namespace: dict = {}
    exec(compile(block, f"{README}:From Python", "exec"), namespace)
    assert namespace["loss"].shape == () and namespace["loss"].requires_grad
    features = namespace["features"]
    assert set(features) == set(namespace["taps"]) and features["stage1"].shape == (8, 16, 32, 32)
    assert sum(p.numel() for p in namespace["method"].parameters()) > 0  # its ABF modules
