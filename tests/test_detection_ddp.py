"""Detection under DDP on the CPU (gloo): two processes launched with torchrun run a tiny ReviewKD
Faster R-CNN for two epochs. Both ranks must end with the same student and ABFs (parameters and
BatchNorm statistics), each rank must train on its own half of the images, and the logged training
losses must be the mean over the ranks, not rank 0's own values."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools", reason="detection evaluation needs pycocotools (kdistill[detection])")

# Each rank records the images and the local loss of every step, then saves what it holds.
DRIVER = """
import os, sys
import torch
from kdistill.cli import quiet_lightning
from kdistill.detection.config import build_detection_config
from kdistill.detection import engine

quiet_lightning(False)
rank = int(os.environ["RANK"])
steps, held = [], {}
plain_step = engine.DetectionModule.training_step

def recording_step(self, batch, batch_idx):
    loss = plain_step(self, batch, batch_idx)
    held["module"] = self
    steps.append({"epoch": self.current_epoch, "step": self.global_step,
                  "images": [int(t["image_id"]) for t in batch[1]], "loss": float(loss)})
    return loss

engine.DetectionModule.training_step = recording_step
cfg = build_detection_config(None, sys.argv[1:])
engine.fit_detection(cfg)
torch.save({"steps": steps, "state": held["module"].model.state_dict()}, os.path.join(cfg.output, f"rank{rank}.pt"))
"""

TINY = ["task=detection", "model=fasterrcnn_resnet18_fpn", "student.slim=true", "student.norm=batchnorm",
        "student.kwargs={min_size: 64, max_size: 64}", "data.image_size=[64, 64]", "data.train_size=8",
        "data.val_size=2", "data.batch_size=2", "data.eval_batch_size=2", "data.max_objects=2",
        "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp",
        "trainer.progress_bar=false", "trainer.log_every_n_steps=1", "optim.lr=0.01",
        "method.name=reviewkd", "method.options.loss_weight=1.0", "teacher.model=fasterrcnn_resnet18_fpn",
        "teacher.slim=true", "teacher.norm=batchnorm", "teacher.kwargs={min_size: 64, max_size: 64}"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("det-ddp")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    out = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver), *TINY,
         f"output={out}"],
        capture_output=True, text=True, timeout=240, env=env, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _ranks(out: Path) -> tuple[dict, dict]:
    return torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)


def test_both_ranks_hold_the_same_student_and_abfs(ddp_run: Path) -> None:
    r0, r1 = _ranks(ddp_run)
    a, b = r0["state"], r1["state"]
    assert a.keys() == b.keys() and not any("teacher" in k for k in a)
    for prefix in ("student.backbone.body.", "student.backbone.fpn.", "student.roi_heads.", "abfs."):
        keys = [k for k in a if k.startswith(prefix)]
        assert keys, f"no state under {prefix!r}"
        differ = [k for k in keys if not torch.equal(a[k], b[k])]
        assert not differ, f"ranks differ in {differ[:5]}"
    # BatchNorm statistics included: they are not broadcast by DDP here, so they must have been averaged
    assert any(k.endswith("running_mean") for k in a if k.startswith("student.backbone.body."))


def test_each_rank_trains_on_its_own_half_of_the_images(ddp_run: Path) -> None:
    r0, r1 = _ranks(ddp_run)
    for epoch in (0, 1):
        seen = [{i for s in r["steps"] if s["epoch"] == epoch for i in s["images"]} for r in (r0, r1)]
        assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
        assert len(seen[0] | seen[1]) == 8
    assert [s["images"] for s in r0["steps"] if s["epoch"] == 0] != [s["images"] for s in r0["steps"] if
                                                                      s["epoch"] == 1]


def test_logged_losses_are_the_mean_over_ranks(ddp_run: Path) -> None:
    r0, r1 = _ranks(ddp_run)
    local = {s["step"]: (s["loss"], t["loss"]) for s, t in zip(r0["steps"], r1["steps"], strict=True)}
    assert len(local) == 4 and all(abs(a - b) > 1e-4 for a, b in local.values())  # the ranks' losses differ
    with open(ddp_run / "logs" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss_step")]
    logged = {int(r["step"]): float(r["train/loss_step"]) for r in rows}
    assert sorted(logged) == sorted(local)
    for step, (a, b) in local.items():
        assert logged[step] == pytest.approx((a + b) / 2, rel=1e-5), f"step {step}: rank losses {a}, {b}"
