"""A seeded run gives the same numbers twice on the same machine and thread count; exports are ordinary files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdistill.cli import main

TINY = ["distill", "seed=7", "data.name=synthetic", "data.num_classes=4", "data.train_size=48", "data.val_size=32",
        "data.image_size=16", "data.batch_size=16", "data.eval_batch_size=16", "model=cifar.resnet8",
        "teacher.model=cifar.resnet8", "teacher.allow_untrained=true", "method.name=dkd", "trainer.max_epochs=2",
        "trainer.progress_bar=false", "optim.schedule=cosine", "optim.lr=0.1"]


def test_same_seed_same_numbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("a", "b"):
            assert main([*TINY, f"output={tmp_path / name}"]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("a", "b"))
    assert a["history"] == b["history"] and a["top1_last"] == b["top1_last"]
    wa, wb = (load_file(str(tmp_path / n / "student.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert len(a["history"]) == 2 and a["history"][0] != a["history"][1]  # it trained


def test_exports_have_the_normal_file_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert main([*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=1", f"output={tmp_path / 'r'}"]) == 0
        assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "e.safetensors")]) == 0
        os.umask(0o027)
        assert main(["export", str(tmp_path / "r"), "--out", str(tmp_path / "g.safetensors")]) == 0
    finally:
        os.umask(old)
    for name, mode in (("r/student.safetensors", 0o644), ("r/student.json", 0o644), ("e.safetensors", 0o644),
                       ("e.json", 0o644), ("g.safetensors", 0o640), ("r/checkpoints/last.ckpt", 0o644)):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
