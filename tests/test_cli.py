"""The ``kdistill`` command end to end on tiny synthetic data, and its bad-input exits."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdistill
from kdistill.cli import main
from kdistill.engine.run import load_exported

TINY = ["data.num_classes=4", "data.train_size=96", "data.val_size=48", "data.image_size=16", "data.batch_size=32",
        "data.eval_batch_size=48", "trainer.max_epochs=1", "trainer.progress_bar=false", "optim.lr=0.05"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    assert main(["train", "model=cifar.resnet14", f"output={out}", *TINY]) == 0
    return out


def test_train_writes_checkpoints_export_and_card(teacher_run: Path) -> None:
    assert (teacher_run / "checkpoints" / "last.ckpt").is_file()
    assert list((teacher_run / "checkpoints").glob("best-epoch*.ckpt"))
    card = json.loads((teacher_run / "student.json").read_text())
    assert card["model"] == "cifar.resnet14" and card["num_classes"] == 4 and card["input_size"] == [3, 16, 16]
    assert len(card["mean"]) == 3 and 0 <= card["metrics"]["top1_last"] <= 100
    assert (teacher_run / "logs" / "metrics.csv").is_file()


def test_distill_eval_export_reload(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "kd"
    code = main(["distill", "model=cifar.resnet8", "method.name=kd", "teacher.model=cifar.resnet14", "teacher.allow_untrained=true",
                 f"teacher.checkpoint={teacher_run / 'student.safetensors'}", f"output={out}", *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-1 (last epoch)" in printed
    metrics = json.loads((out / "metrics.json").read_text())

    assert main(["eval", str(out)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the exported final weights give the accuracy that training logged for its last epoch
    assert evaluated["top1"] == pytest.approx(metrics["top1_last"], abs=1e-3)

    assert main(["eval", str(out / "checkpoints" / "last.ckpt")]) == 0
    from_ckpt = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_ckpt["top1"] == pytest.approx(evaluated["top1"], abs=1e-3)

    exported = tmp_path / "export" / "s.safetensors"
    assert main(["export", str(out), "--out", str(exported), "--onnx"]) == 0
    model, card = load_exported(exported)
    assert card["method"] == "kd" and card["teachers"] == ["cifar.resnet14"]
    original, _ = load_exported(out / "student.safetensors")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(x), original.eval()(x))
    onnx_file = exported.with_suffix(".onnx")
    assert onnx_file.stat().st_size > 10_000
    import onnx

    graph = onnx.load(str(onnx_file)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    # the export holds the student only, never the teacher
    from safetensors import safe_open

    with safe_open(str(exported), "pt") as fh:
        keys = list(fh.keys())
    assert keys and not any(k.startswith(("teacher", "method", "distiller")) for k in keys)
    assert set(keys) == set(kdistill.create_model("cifar.resnet8", num_classes=4).state_dict())


def test_print_config_and_recipes(capsys: pytest.CaptureFixture) -> None:
    assert main(["distill", "method.name=kd", "teacher.model=cifar.resnet20", "optim.lr=0.3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.3" in out and "name: kd" in out and "model: cifar.resnet20" in out
    assert main(["recipes"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
        (["train", "model=cifar.resnet21"], "unknown model for student.model 'cifar.resnet21'"),
        (["distill", "method.name=kd"], "needs at least one teacher"),
        (["distill", "method.name=kdd", "teacher.model=cifar.resnet8"], "unknown method 'kdd'"),
        (["train", "data.batch_size=big"], "data.batch_size: expected an integer"),
        (["train", "method.name=kd"], "kdistill train trains without teachers"),
        (["eval", "/nonexistent/run.safetensors"], "does not exist"),
    ],
)
def test_bad_input_exit_code_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_teacher_class_count_mismatch(teacher_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["distill", "method.name=kd", "teacher.model=cifar.resnet14", "teacher.allow_untrained=true", "model=cifar.resnet8",
            f"teacher.checkpoint={teacher_run / 'student.safetensors'}", f"output={tmp_path / 'x'}",
            *TINY, "data.num_classes=5"]
    assert main(argv) == 2
    assert "shape mismatch" in capsys.readouterr().err and "fc.weight" in capsys.readouterr().err + "fc.weight"


def test_malicious_pickle_teacher_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"model": Evil()}, fh)
    argv = ["distill", "method.name=kd", "teacher.model=cifar.resnet8", f"teacher.checkpoint={evil}",
            f"output={tmp_path / 'o'}", *TINY]
    assert main(argv) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_console_script_exit_code() -> None:
    exe = Path(sys.executable).with_name("kdistill")
    proc = subprocess.run([str(exe), "train", "optim.lrr=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Did you mean 'optim.lr'" in proc.stderr


def test_arbitrary_bytes_as_weights_always_give_a_clear_error(tmp_path: Path) -> None:
    """Damaged files make the restricted unpickler fail in many ways; each must become CheckpointError."""
    import random

    from kdistill.checkpoint import CheckpointError, read_state_dict

    rng = random.Random(0)
    for i in range(200):
        junk = tmp_path / f"junk{i}.pth"
        junk.write_bytes(bytes([0x80, rng.randrange(1, 6)]) + rng.randbytes(rng.randrange(1, 400)))
        with pytest.raises(CheckpointError, match="refused to load|truncated or not a PyTorch weights file") as info:
            read_state_dict(junk)
        assert "nothing in it was run" in str(info.value) and str(junk) in str(info.value)
