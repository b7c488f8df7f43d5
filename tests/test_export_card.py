"""Exports never write two files to one path, and cards are checked when read (kdistill.card)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdistill.cli import main

TINY = ["model=cifar.resnet8", "data.num_classes=4", "data.train_size=64", "data.val_size=32", "data.image_size=16",
        "data.batch_size=32", "data.eval_batch_size=32", "trainer.max_epochs=1", "trainer.progress_bar=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["train", f"output={out}", *TINY]) == 0
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(("out", "onnx"), [("x.json", False), ("x.onnx", True), ("x", False), ("x.pt", True)])
def test_export_to_a_path_its_card_or_graph_would_share_is_refused(
    out: str, onnx: bool, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    target = tmp_path / "exports"
    target.mkdir()
    (target / "x.safetensors").write_bytes(b"an earlier export")
    (target / "x.json").write_text("{}")
    before = digest(target)
    code = main(["export", str(run), "--out", str(target / out), *(["--onnx"] if onnx else [])])
    err = capsys.readouterr().err
    assert code == 2 and "an export is a .safetensors file" in err and "Traceback" not in err
    assert digest(target) == before


def test_export_with_onnx_writes_three_distinct_files(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnx")
    out = tmp_path / "s.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".s.safetensors.tmp-{int(dead.stdout)}").write_bytes(b"half an export")  # its writer was killed
    assert main(["export", str(run), "--out", str(out), "--onnx"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"s.safetensors", "s.json", "s.onnx"}
    assert json.loads((tmp_path / "s.json").read_text())["model"] == "cifar.resnet8"
    assert (tmp_path / "s.safetensors").read_bytes()[8:9] == b"{"  # a safetensors header, not JSON or a graph


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: "{not json", "is not valid JSON"),
        (lambda c: [1, 2], "the card must be a JSON object"),
        (lambda c: {**c, "model": 5}, "model must be a model name"),
        (lambda c: {**c, "num_classes": "four"}, "num_classes must be an integer >= 1"),
        (lambda c: {**c, "num_classes": 0}, "num_classes must be an integer >= 1"),
        (lambda c: {**c, "input_size": [3, 16]}, "input_size must be [channels, height, width]"),
        (lambda c: {**c, "std": [0.2, 0.0, 0.2]}, "std must be a list of 3 finite numbers > 0"),
        (lambda c: {**c, "mean": "0.5"}, "mean must be a list of 3 finite numbers"),
        (lambda c: {**c, "model_kwargs": [1]}, "model_kwargs must be a mapping"),
        (lambda c: {**c, "classes": ["a"]}, "classes must be a list of 4 class names"),
        (lambda c: {k: v for k, v in c.items() if k != "model"}, "model must be a model name"),
    ],
)
def test_malformed_card_exits_2(edit, message: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    card = json.loads((tmp_path / "s.json").read_text())
    edited = edit(card)
    (tmp_path / "s.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    before = digest(tmp_path)
    for argv in (["eval", str(out)], ["export", str(out), "--out", str(tmp_path / "again.safetensors")]):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and message in err and str(out) in err and "Traceback" not in err, err
    assert digest(tmp_path) == before


def test_malformed_run_card_of_a_checkpoint_exits_2(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "run.json").write_text(json.dumps({"model": "cifar.resnet8"}))
    code = main(["eval", str(copy / "checkpoints" / "last.ckpt")])
    err = capsys.readouterr().err
    assert code == 2 and "num_classes must be an integer" in err and "Traceback" not in err
