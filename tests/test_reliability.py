"""Faults a run must survive (docs/reliability.md): SIGKILL and --resume, NaN losses, a full disk,
damaged or unsafe files and bad configuration. Each bad-input case checks the exit code, the message
(no traceback) and that nothing already on disk changed."""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import kdistill_command, kill_at_first_checkpoint, subprocess_env
from safetensors.torch import load_file

from kdistill.cli import main
from kdistill.methods.kd import KD

TINY = ["data.num_classes=4", "data.train_size=96", "data.val_size=48", "data.image_size=16", "data.batch_size=32",
        "data.eval_batch_size=48", "trainer.max_epochs=1", "trainer.progress_bar=false", "optim.lr=0.05",
        "optim.schedule=constant"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def ckpt_epoch(path: Path) -> int:
    return torch.load(path, weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run (4 classes): a teacher export, checkpoints and a card."""
    out = tmp_path_factory.mktemp("good") / "run"
    assert main(["train", "model=cifar.resnet8", f"output={out}", *TINY]) == 0
    return out


# --- kill and resume ---------------------------------------------------------------------------

KILL = ["distill", "model=cifar.resnet8", "method.name=meal_v1", "teacher.model=cifar.resnet8", "teacher.allow_untrained=true",
        "data.num_classes=4", "data.train_size=384", "data.val_size=32", "data.image_size=16",
        "data.batch_size=16", "data.eval_batch_size=32", "trainer.max_epochs=2", "trainer.progress_bar=false",
        "optim.lr=0.05", "optim.milestones=[1]", "optim.gamma=0.5"]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    # the run killed during its second epoch
    killed = tmp_path / "killed"
    last = kill_at_first_checkpoint(KILL, killed)
    assert ckpt_epoch(last) == 0  # the end-of-epoch-1 checkpoint, intact (atomic write)
    assert main(["eval", str(last)]) == 0  # a checkpoint left by a kill still evaluates

    done = subprocess.run([*kdistill_command(KILL, killed), "--resume"], capture_output=True, text=True,
                          env=subprocess_env(), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]

    # the same recipe without interruption, in this process
    straight = tmp_path / "straight"
    assert main([*KILL, f"output={straight}"]) == 0

    a = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"]
    disc = [k for k in b["state_dict"] if ".discriminators." in k]
    assert disc
    for key, value in b["state_dict"].items():  # student, discriminators, CRD-like buffers: everything
        torch.testing.assert_close(a["state_dict"][key], value, rtol=0, atol=0, msg=key)
    # optimizer (momentum), scheduler (step count, lr after the milestone), discriminators' optimizer
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        torch.testing.assert_close(opt_a["state"], opt_b["state"], rtol=0, atol=0)
        assert opt_a["param_groups"] == opt_b["param_groups"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(0.025)
    assert a["own_optimizer"]["state"], "the discriminators' optimizer state was not saved"
    torch.testing.assert_close(a["own_optimizer"]["state"], b["own_optimizer"]["state"], rtol=0, atol=0)
    torch.testing.assert_close(a["rng_state"]["torch"], b["rng_state"]["torch"], rtol=0, atol=0)
    ea, eb = load_file(killed / "student.safetensors"), load_file(straight / "student.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    """Without the saved RNG state a resumed run would draw other augmentations than the run it continues."""
    import random

    import numpy as np

    from kdistill.engine.module import rng_state, set_rng_state

    torch.manual_seed(1)
    saved = rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    torch.save(saved, tmp_path / "rng.pt")
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # as a checkpoint is loaded
    got = (torch.rand(3), random.random(), np.random.rand())
    torch.testing.assert_close(got[0], expected[0])
    assert got[1:] == expected[1:]


# --- numerics ----------------------------------------------------------------------------------

def test_nan_loss_stops_with_term_and_step_and_keeps_checkpoint(
    good_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    forward = KD.forward

    def nan_in_second_epoch(self, batch, student, teachers, info):
        losses = forward(self, batch, student, teachers, info)
        if info.epoch == 1:
            losses["kd"] = losses["kd"] * float("nan")
        return losses

    monkeypatch.setattr(KD, "forward", nan_in_second_epoch)
    out = tmp_path / "nan"
    argv = ["distill", "model=cifar.resnet8", "method.name=kd", "teacher.model=cifar.resnet8",
            f"teacher.checkpoint={good_run / 'student.safetensors'}", f"output={out}", *TINY, "trainer.max_epochs=2"]
    code, err = run_cli(argv, capsys)
    assert code == 3
    assert "loss term 'kd' is nan at epoch 1, step 3" in err  # 96 samples / 32 = 3 steps per epoch
    assert "last good checkpoint is kept" in err
    last = out / "checkpoints" / "last.ckpt"
    assert ckpt_epoch(last) == 0
    assert not (out / "student.safetensors").exists()
    assert main(["eval", str(last)]) == 0


# --- full disk -----------------------------------------------------------------------------------

def _disk_full_after(calls: int, real):
    """A writer that works ``calls`` times, then writes half its output and fails with ENOSPC."""
    count = {"n": 0}

    def write(obj, target, *args, **kwargs):
        count["n"] += 1
        if count["n"] <= calls:
            return real(obj, target, *args, **kwargs)
        if hasattr(target, "write"):
            target.write(b"PK\x03\x04 partial")
        else:
            Path(target).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_full_disk_while_checkpointing_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import kdistill.engine.callbacks as callbacks

    # epoch 1 writes best + last; the first write of epoch 2 hits a full disk
    monkeypatch.setattr(callbacks.torch, "save", _disk_full_after(2, torch.save))
    out = tmp_path / "full"
    code, err = run_cli(["train", "model=cifar.resnet8", f"output={out}", *TINY, "trainer.max_epochs=2"], capsys)
    monkeypatch.undo()
    assert code == 4
    assert "No space left on device" in err and "previous checkpoint at this path is kept" in err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and not [n for n in ckpts if n.startswith(".")], ckpts  # no temporary left
    for name in ckpts:
        assert ckpt_epoch(out / "checkpoints" / name) == 0
    assert main(["eval", str(out / "checkpoints" / "last.ckpt")]) == 0


def test_full_disk_while_exporting_keeps_previous_export(
    good_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import kdistill.checkpoint as checkpoint

    target = tmp_path / "export" / "s.safetensors"
    assert main(["export", str(good_run), "--out", str(target)]) == 0
    before = snapshot(target.parent)
    monkeypatch.setattr(checkpoint, "save_file", _disk_full_after(0, checkpoint.save_file))
    code, err = run_cli(["export", str(good_run), "--out", str(target)], capsys)
    assert code == 4 and "No space left on device" in err and str(target) in err
    assert snapshot(target.parent) == before


# --- bad input -----------------------------------------------------------------------------------

class Evil:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _evil_pickle(path: Path, marker: Path) -> Path:
    evil = Evil()
    evil.marker = marker
    with open(path, "wb") as fh:
        pickle.dump({"model": evil}, fh)
    return path


def test_pickle_with_code_is_refused_as_teacher_and_as_resume_checkpoint(
    good_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    evil = _evil_pickle(tmp_path / "evil.pth", marker)
    out = tmp_path / "o"
    code, err = run_cli(["distill", "method.name=kd", "teacher.model=cifar.resnet8", f"teacher.checkpoint={evil}",
                         f"output={out}", *TINY], capsys)
    assert code == 2 and "refused to load" in err and str(evil) in err
    assert not marker.exists() and not out.exists()

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    _evil_pickle(run / "checkpoints" / "last.ckpt", marker)
    before = snapshot(run)
    code, err = run_cli(["train", "model=cifar.resnet8", f"output={run}", *TINY, "--resume"], capsys)
    assert code == 2 and "refused to load checkpoint" in err
    code, err = run_cli(["eval", str(run / "checkpoints" / "last.ckpt")], capsys)
    assert code == 2 and "refused to load" in err
    assert not marker.exists() and snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_checkpoint_is_reported_and_left_alone(
    damage: str, good_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    last = run / "checkpoints" / "last.ckpt"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2 : len(data) // 2 + 4096] = os.urandom(4096)
        data[-200:] = os.urandom(200)  # the zip directory too
    last.write_bytes(bytes(data))
    before = snapshot(run)
    code, err = run_cli(["train", "model=cifar.resnet8", f"output={run}", *TINY, "--resume"], capsys)
    assert code == 2 and "truncated or corrupted" in err and "best-" in err
    code, err = run_cli(["eval", str(last)], capsys)
    assert code == 2 and "truncated or not a PyTorch weights file" in err
    assert snapshot(run) == before
    # the other checkpoint of the run still works
    best = next((run / "checkpoints").glob("best-*.ckpt"))
    assert main(["eval", str(best)]) == 0


def test_damaged_teacher_files(good_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = (good_run / "student.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src[: len(src) // 3])
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(5000))  # random bytes fail in the unpickler or before it: both say nothing ran
    for path, message in ((cut, "is not a readable safetensors file"), (junk, "nothing in it was run")):
        code, err = run_cli(["distill", "method.name=kd", "teacher.model=cifar.resnet8", f"teacher.checkpoint={path}",
                             f"output={tmp_path / 'o'}", *TINY], capsys)
        assert code == 2 and message in err and str(path) in err
    assert not (tmp_path / "o").exists()


def test_teacher_class_count_differs(good_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(good_run)
    code, err = run_cli(["distill", "method.name=kd", "teacher.model=cifar.resnet8", "model=cifar.resnet8",
                         f"teacher.checkpoint={good_run / 'student.safetensors'}", f"output={tmp_path / 'x'}",
                         *TINY, "data.num_classes=5"], capsys)
    assert code == 2 and "shape mismatch" in err and "fc.weight: file (4, 64) vs model (5, 64)" in err
    assert snapshot(good_run) == before and not (tmp_path / "x").exists()


def _image_folder(root: Path, bad: bool = False, empty: bool = False) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 2)):
        for c in range(3):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            if empty and split == "train" and c == 2:
                continue
            for i in range(n):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    if bad:
        (root / "train" / "c1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


FOLDER = ["model=cifar.resnet8", "data.name=imagefolder", "data.batch_size=6", "data.eval_batch_size=6",
          "trainer.max_epochs=1", "trainer.progress_bar=false"]


def test_corrupted_image_skipped_and_counted_or_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    root = _image_folder(tmp_path / "imgs", bad=True)
    before = snapshot(root)
    out = tmp_path / "o"
    common = [*FOLDER, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", f"output={out}"]
    code, err = run_cli(["train", *common, "data.on_bad_image=error"], capsys)
    assert code == 2 and "cannot read image" in err and "broken.png" in err
    assert not out.exists()
    code, _ = run_cli(["train", *common], capsys)  # skip is the default
    assert code == 0
    import json

    assert json.loads((out / "student.json").read_text())["skipped_images"] == 1
    assert any("skipped 1 unreadable images" in r.getMessage() for r in caplog.records)
    assert snapshot(root) == before


def test_empty_class_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _image_folder(tmp_path / "imgs", empty=True)
    code, err = run_cli(["train", *FOLDER, f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}",
                         f"output={tmp_path / 'o'}"], capsys)
    assert code == 2 and "class folders without images: ['c2']" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("recipe", "overrides", "message"),
    [
        ("optim:\n  lrr: 0.1\n", [], "unknown config key 'optim.lrr'. Did you mean 'optim.lr'"),
        ("optim:\n  momentum: fast\n", [], "optim.momentum: expected a number, got 'fast'"),
        ("trainer:\n  log_every_n_steps: [1, 2]\n", [], "trainer.log_every_n_steps: expected an integer"),
        ("optim: {lr: 0.1\n", [], "is not valid YAML"),
        ("- a\n- b\n", [], "must be a mapping of sections"),
        ("", ["=0.1"], "malformed override '=0.1'"),
        ("", ["optim..lr=0.1"], "malformed override"),
        ("", ["optim.lr=[0.1"], "value is not valid YAML"),
        ("", ["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
        ("", ["optim.lr=-0.1"], "optim.lr must be >= 0, got -0.1"),
        ("", ["method.name=kd", "method.options.temperature=-4"], "temperature must be > 0, got -4"),
        ("", ["method.name=kd", "method.options.kd_weight=-0.5"], "kd_weight must be a finite number >= 0, got -0.5"),
        ("", ["method.name=kd", "method.options.ce_weight=.inf"], "ce_weight must be a finite number >= 0, got inf"),
        ("", ["method.name=crd", "method.options.temperature=0"], "temperature must be > 0, got 0"),
        ("", ["method.name=kd", "method.options.temprature=4"], "Did you mean 'temperature'"),
    ],
)
def test_bad_configuration_exits_2_and_writes_nothing(
    recipe: str, overrides: list[str], message: str, good_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["distill"]
    if recipe:
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe)
        argv.append(str(path))
    before = snapshot(good_run)
    argv += ["teacher.model=cifar.resnet8", "teacher.allow_untrained=true", f"output={good_run}", *TINY, *overrides]
    code, err = run_cli(argv, capsys)
    assert code == 2 and message in err, err
    assert snapshot(good_run) == before


def test_unwritable_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    code, err = run_cli(["train", "model=cifar.resnet8", f"output={blocker / 'run'}", *TINY], capsys)
    assert code == 2 and "cannot be written" in err and str(blocker / "run") in err
    assert blocker.read_text() == "keep me"
