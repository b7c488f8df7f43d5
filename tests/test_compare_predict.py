"""``kdistill compare`` (table and curves of finished runs) and ``kdistill predict`` (the card's preprocessing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from kdistill.cli import main
from kdistill.config import build_config
from kdistill.engine.build import load_data
from kdistill.engine.run import load_exported

COMMON = ["data.name=imagefolder", "data.image_size=16", "data.batch_size=8", "data.eval_batch_size=8",
          "model=cifar.resnet8", "trainer.max_epochs=2", "trainer.progress_bar=false", "optim.schedule=cosine",
          "optim.lr=0.05"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cmp")
    folder = make_image_folder(root / "images")
    common = [*COMMON, f"data.root={folder}", f"data.cache_dir={root / 'cache'}"]
    assert main(["train", *common, f"output={root / 'runs' / 'student'}"]) == 0
    assert main(["distill", *common, "method.name=kd", "teacher.model=cifar.resnet8", "teacher.evaluate=false",
                 f"teacher.checkpoint={root / 'runs' / 'student' / 'student.safetensors'}",
                 f"output={root / 'runs' / 'kd'}"]) == 0
    return root


def test_compare_table_and_curves(runs: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    png = runs / "cmp.png"
    assert main(["compare", str(runs / "runs" / "student"), str(runs / "runs" / "kd"), "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "student", "teacher", "method", "top-1", "%", "best", "%", "top-5", "%",
                                "params", "img/s", "time", "s"]
    params = sum(p.numel() for p in load_exported(runs / "runs" / "kd" / "student.safetensors")[0].parameters())
    for line, name, teacher, method in ((lines[1], "student", "-", "ce"), (lines[2], "kd", "cifar.resnet8", "kd")):
        metrics = json.loads((runs / "runs" / name / "metrics.json").read_text())
        cells = line.split()
        assert cells[1:4] == ["cifar.resnet8", teacher, method]
        assert cells[4:7] == [f"{metrics['top1_last']:.2f}", f"{metrics['top1_best']:.2f}", f"{metrics['top5_last']:.2f}"]
        assert cells[7] == f"{params:,}"
    assert lines[3] == f"curves: {png}"
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (1000, 400)


def test_compare_refuses_an_unfinished_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", str(tmp_path)]) == 2
    assert "is not a finished run folder" in capsys.readouterr().err


def test_predict_uses_the_cards_preprocessing(runs: Path, capsys: pytest.CaptureFixture) -> None:
    export = runs / "runs" / "kd" / "student.safetensors"
    model, card = load_exported(export)
    assert card["preprocessing"]["resize"] == [16, 16] and card["preprocessing"]["mean"] == card["mean"]
    files = sorted((runs / "images" / "val").rglob("*.png"))
    capsys.readouterr()
    assert main(["predict", str(export), *map(str, files), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # the same images as training read them (resized from 20 to 16 pixels when the folder was loaded)
    data = load_data(build_config(None, [*COMMON, f"data.root={runs / 'images'}", f"data.cache_dir={runs / 'cache'}"]))
    x = (data.val.images.float() / 255 - torch.tensor(card["mean"]).view(1, -1, 1, 1)) / torch.tensor(card["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        probs = model.eval()(x).softmax(1)
    for line, path, p in zip(lines, files, probs, strict=True):
        name, first, _, second = line.split()[1:]
        assert line.startswith(f"{path}  ")
        top = p.topk(2)
        assert name == card["classes"][int(top.indices[0])]
        assert float(first) == pytest.approx(float(top.values[0]), abs=5e-4)
        assert float(second) == pytest.approx(float(top.values[1]), abs=5e-4)


def test_onnx_with_preprocessing_inside(runs: Path, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from kdistill.engine.run import WithPreprocessing

    out = tmp_path / "s.safetensors"
    assert main(["export", str(runs / "runs" / "kd"), "--out", str(out), "--onnx-preprocess"]) == 0
    model, card = load_exported(out)
    contract = card["onnx"]["input"]
    assert (contract["dtype"], contract["shape"]) == ("uint8", ["N", 3, "H", "W"]) and "resized to 16x16" in contract["inside"]
    session = ReferenceEvaluator(onnx.load(str(out.with_suffix(".onnx"))))
    wrapped = WithPreprocessing(model.eval(), card).eval()
    images = torch.randint(0, 256, (2, 3, 20, 24), dtype=torch.uint8)  # another size than the model's input
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), wrapped(images), atol=1e-4, rtol=1e-4)
        same_size = images[:, :, :16, :16]  # at the input size the resize is the identity
        mean, std = (torch.tensor(card[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
        torch.testing.assert_close(wrapped(same_size), model((same_size.float() / 255 - mean) / std))
