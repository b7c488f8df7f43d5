"""Run folders are owned and locked, resume is checked against the run, signals stop cleanly
(engine/rundir.py, engine/resume.py, engine/signals.py). Every bad case checks the exit code, the
message (no traceback) and that nothing on disk changed."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.cli import main

TINY = ["model=cifar.resnet8", "data.num_classes=4", "data.train_size=96", "data.val_size=48", "data.image_size=16",
        "data.batch_size=32", "data.eval_batch_size=48", "trainer.max_epochs=1", "trainer.progress_bar=false",
        "optim.lr=0.05", "optim.schedule=constant"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", f"output={out}", *TINY]) == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- ownership -----------------------------------------------------------------------------------

def test_new_run_into_a_finished_run_is_refused(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, _, err = run_cli(["train", f"output={run}", *TINY], capsys)
    assert code == 2 and str(run) in err and "already holds a kdistill run" in err and "--overwrite" in err
    assert snapshot(run) == before


def test_new_run_into_a_users_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    code, _, err = run_cli(["train", f"output={folder}", *TINY], capsys)
    assert code == 2 and "files that are not a new kdistill run" in err and str(folder) in err
    assert snapshot(folder) == {"thesis.tex": hashlib.sha256(b"precious").hexdigest()}


def test_overwrite_moves_the_old_run_aside(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, out, _ = run_cli(["train", f"output={run}", *TINY, "--overwrite"], capsys)
    assert code == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and str(aside[0]) in out
    assert snapshot(aside[0]) == before  # moved, byte for byte, never deleted
    marker = json.loads((run / ".kdistill-run").read_text())
    assert marker["replaced"] == str(aside[0]) and marker["pid"] == os.getpid()
    assert (run / "student.safetensors").is_file()


def test_empty_existing_folder_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    code, _, _ = run_cli(["train", f"output={folder}", *TINY], capsys)
    assert code == 0 and (folder / ".kdistill-run").is_file()


def test_folder_in_use_is_refused_and_a_dead_holder_is_taken_over(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = copy_run(finished, tmp_path / "run")
    marker = json.loads((run / ".kdistill-run").read_text())
    marker["pid"] = 999999  # a process that no longer exists, as a killed run leaves it
    (run / ".kdistill-run").write_text(json.dumps(marker))
    before = snapshot(run)
    fd = os.open(run, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another live process using the folder
    try:
        for extra in (["--resume", "trainer.max_epochs=2"], ["--overwrite"]):
            code, _, err = run_cli(["train", f"output={run}", *TINY, *extra], capsys)
            assert code == 2 and "is in use by process 999999" in err, err
        assert snapshot(run) == before and not list(tmp_path.glob("run.replaced-*"))
    finally:
        os.close(fd)
    # the holder is gone (its lock went with it): the folder is taken over
    code, _, _ = run_cli(["train", f"output={run}", *TINY, "--resume", "trainer.max_epochs=2"], capsys)
    assert code == 0
    assert json.loads((run / ".kdistill-run").read_text())["pid"] == os.getpid()


def test_two_processes_cannot_share_a_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "kdistill.cli", "train", f"output={out}", *TINY]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".kdistill-run").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # frozen while holding the folder: the test does not race it
        try:  # both at once: each is refused before it trains
            others = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                      for a in ([*args, "--resume"], args)]
            (_, second), (_, third) = (p.communicate(timeout=90) for p in others)
        finally:
            first.send_signal(signal.SIGCONT)
        assert others[0].returncode == 2 and f"is in use by process {first.pid}" in second, second[-1500:]
        assert others[1].returncode == 2 and "already holds a kdistill run" in third, third[-1500:]
        assert "Traceback" not in second + third
    finally:
        first.wait(timeout=120)
        first.stderr.close()
    assert first.returncode == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1


# --- resume ------------------------------------------------------------------------------------

def test_resume_of_a_finished_run_changes_nothing(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    code, out, _ = run_cli(["train", f"output={run}", *TINY, "--resume"], capsys)
    assert code == 0 and "already trained 1 epochs" in out and "nothing was changed" in out
    assert snapshot(run) == before
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 1


@pytest.mark.parametrize(
    ("override", "key"),
    [("model=cifar.resnet14", "student.model"), ("method.name=kd", "method.name"), ("optim.lr=0.5", "optim.lr"),
     ("data.batch_size=16", "data.batch_size")],
)
def test_resume_with_a_change_the_checkpoint_cannot_follow(
    override: str, key: str, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = copy_run(finished, tmp_path / "run")
    before = snapshot(run)
    command = "distill" if override.startswith("method") else "train"
    extra = ["teacher.model=cifar.resnet8", "teacher.allow_untrained=true"] if command == "distill" else []
    code, _, err = run_cli([command, f"output={run}", *TINY, *extra, override, "trainer.max_epochs=2", "--resume"],
                           capsys)
    assert code == 2 and f"--resume: {key} is" in err and "Nothing was changed" in err, err
    assert snapshot(run) == before  # config.json and run.json too: the best checkpoint still evaluates
    assert main(["eval", str(next((run / "checkpoints").glob("best-*.ckpt")))]) == 0


def test_resume_longer_appends_history_and_records_the_change(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = copy_run(finished, tmp_path / "run")
    first_rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    (run / "checkpoints" / ".last.ckpt.tmp-4242").write_bytes(b"half a checkpoint")  # a killed write's leftover
    code, out, _ = run_cli(["train", f"output={run}", *TINY, "trainer.max_epochs=2", "--resume"], capsys)
    assert code == 0 and "resume: trainer.max_epochs changes from 1 to 2" in out
    history = json.loads((run / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]
    rows = (run / "logs" / "metrics.csv").read_text().splitlines()
    assert len(rows) > len(first_rows) and all(r in rows[1:] or r == first_rows[0] for r in first_rows[1:])
    marker = json.loads((run / ".kdistill-run").read_text())
    assert marker["resumes"] == [{"epochs_done": 1, "changes": {"trainer.max_epochs": [1, 2]}}]
    assert json.loads((run / "config.json").read_text())["trainer"]["max_epochs"] == 2
    assert not list((run / "checkpoints").glob(".*tmp*"))


def test_resume_without_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(["train", f"output={tmp_path / 'nothing'}", *TINY, "--resume"], capsys)
    assert code == 2 and "there is no run at" in err and not (tmp_path / "nothing").exists()
    code, _, err = run_cli(["train", f"output={tmp_path / 'x'}", *TINY, "--resume", "--overwrite"], capsys)
    assert code == 2 and "exclude each other" in err


# --- signals -------------------------------------------------------------------------------------

LONG = ["data.train_size=960", "data.batch_size=16", "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]


def _launch(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kdistill.cli", "train", f"output={out}", *TINY, *LONG]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _training(proc: subprocess.Popen, out: Path) -> subprocess.Popen:
    deadline = time.monotonic() + 90
    while not (out / "logs" / "metrics.csv").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the CSV log appears after the first training step
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    return proc


def _start(out: Path) -> subprocess.Popen:
    return _training(_launch(out), out)


def test_sigterm_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "stopped"
    proc = _start(out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM after finishing the current step" in err and "--resume" in err
    assert "Traceback" not in err
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert 0 < ckpt["global_step"] < 2 * 60 and not (out / "student.safetensors").exists()
    assert f"step {ckpt['global_step']}" in err

    code, _, _ = run_cli(["train", f"output={out}", *TINY, *LONG, "--resume"], capsys)
    assert code == 0
    straight = tmp_path / "straight"
    assert main(["train", f"output={straight}", *TINY, *LONG]) == 0
    a, b = load_file(out / "student.safetensors"), load_file(straight / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # no batch repeated or skipped
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert [row["epoch"] for row in history] == [1, 2]


def test_sigint_exits_130_and_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    out, out2 = tmp_path / "int", tmp_path / "twice"
    once, twice = _launch(out), _launch(out2)
    _training(once, out).send_signal(signal.SIGINT)
    _training(twice, out2).send_signal(signal.SIGTERM)
    twice.send_signal(signal.SIGTERM)
    _, err = once.communicate(timeout=120)
    assert once.returncode == 130 and "stopped by SIGINT" in err and "Traceback" not in err, err[-2000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] > 0
    _, err = twice.communicate(timeout=120)
    assert twice.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert "again: stopping at once" in err or "stopped by SIGTERM" in err
    # whatever it stopped in, every checkpoint on disk is whole (a cut-off write leaves only a
    # temporary, which the next --resume removes: test_resume_longer_appends_history_...)
    for ckpt in (out2 / "checkpoints").glob("*.ckpt"):
        assert torch.load(ckpt, weights_only=True)["global_step"] >= 0
