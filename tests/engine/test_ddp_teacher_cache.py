"""The teacher-output cache under DDP: a two-process CPU (gloo) ``distill`` run with
``teacher.cache=DIR`` and KD, launched with torchrun as docs/distributed.md says.

Each rank records, for every training step, the dataset indices of its batch, the cached view drawn
for each sample, the student's input, the cached logits handed to the method, the student's logits
and the KD loss. The test then rebuilds every step on its own: the view from the uint8 training image
and the cache's (dy, dx, flip) of that (index, view), a fresh teacher pass on it, and KD by the
textbook formula. A rank that looked up another rank's rows, a shard-local position instead of the
dataset index, or another view than the one its student saw, fails these comparisons."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kdistill.cli import main
from kdistill.config import build_config
from kdistill.engine.build import build_run

# Each rank records what the cache gave it, trains, then saves the records and its weights.
DRIVER = """
import os, sys
import lightning as L
import torch
from kdistill.cli import quiet_lightning
from kdistill.config import build_config
from kdistill.step import Distiller
from kdistill.engine.build import build_run
from kdistill.engine.run import fit
from kdistill.engine.teacher_cache import TeacherCache

quiet_lightning(False)
rank = int(os.environ["RANK"])
steps, teacher_calls = [], []
draw, batch_of, forward_train, teacher_forward = (TeacherCache.draw_views, TeacherCache.training_batch,
                                                  Distiller.forward_train, Distiller.teacher_forward)

def draw_views(self, n, generator=None):
    view = draw(self, n, generator)
    steps.append({"view": view.clone()})
    return view

def training_batch(self, batch, augment, teachers, generator=None):
    out, outputs = batch_of(self, batch, augment, teachers, generator)
    steps[-1].update(index=batch.index.detach().cpu().clone(), images=out.images.detach().cpu().clone(),
                     cached=outputs[0].logits.detach().cpu().clone())
    return out, outputs

def forward_train_rec(self, batch, info, teachers=None, own_step=None):
    logits, losses = forward_train(self, batch, info, teachers=teachers, own_step=own_step)
    if teachers is not None:
        steps[-1].update(student=logits.detach().cpu().clone(), kd=losses["kd"].detach().cpu().clone())
    return logits, losses

def teacher_forward_rec(self, i, images):
    teacher_calls.append(i)
    return teacher_forward(self, i, images)

TeacherCache.draw_views, TeacherCache.training_batch = draw_views, training_batch
Distiller.forward_train, Distiller.teacher_forward = forward_train_rec, teacher_forward_rec
cfg = build_config(None, sys.argv[1:])
L.seed_everything(cfg.seed, verbose=False)
built = build_run(cfg)
assert built.teacher_cache is not None
fit(cfg, built=built)
torch.save({"state": built.distiller.state_dict(), "steps": steps, "teacher_calls": len(teacher_calls)},
           os.path.join(cfg.output, f"rank{rank}.pt"))
"""

TRAIN_SIZE, BATCH, VIEWS, TEMPERATURE, KD_WEIGHT = 64, 8, 2, 4.0, 0.9
COMMON = ["data.name=synthetic", "model=cifar.resnet8", "teacher.model=cifar.resnet8", "teacher.allow_untrained=true", "data.num_classes=4",
          f"data.train_size={TRAIN_SIZE}", "data.val_size=16", "data.image_size=16", f"data.batch_size={BATCH}",
          "data.eval_batch_size=16", "method.name=kd", "trainer.max_epochs=1", "trainer.accelerator=cpu",
          "trainer.progress_bar=false", "optim.lr=0.1"]
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]


@pytest.fixture(scope="module")
def cached_ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ddp_cache")
    cache, out = root / "cache", root / "run"
    assert main(["cache-teacher", *COMMON, "--views", str(VIEWS), "--storage", "fp32", "--out", str(cache)]) == 0
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
         *COMMON, *DDP, f"teacher.cache={cache}", f"output={out}"],
        capture_output=True, text=True, timeout=240, env=env, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cache, out


def test_cached_logits_under_ddp_match_each_ranks_own_views(cached_ddp_run: tuple[Path, Path]) -> None:
    cache_dir, out = cached_ddp_run
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    # (a) DDP kept the two students identical
    keys = [k for k in r0["state"] if k.startswith("student.")]
    assert keys and not [k for k in keys if not torch.equal(r0["state"][k], r1["state"][k])]
    # the cache replaced the teacher: no teacher pass ran during training on either rank
    assert r0["teacher_calls"] == r1["teacher_calls"] == 0

    # an independent reference: the same data, augmentation, teacher (seeded as distill seeds it) and cache
    cfg = build_config(None, COMMON)
    L.seed_everything(cfg.seed, verbose=False)
    built = build_run(cfg)
    train, augment, distiller = built.data.train, built.augment, built.distiller.eval()
    params = load_file(str(cache_dir / "tensors.safetensors"))["params"].long()  # N×K×(dy, dx, flip)
    assert params.shape == (TRAIN_SIZE, VIEWS, 3)

    per_rank = []
    for rank, rec in enumerate((r0, r1)):
        steps = rec["steps"]
        assert len(steps) == TRAIN_SIZE // 2 // BATCH, f"rank {rank}: {len(steps)} cached steps"
        seen = []
        for s, step in enumerate(steps):
            index, view = step["index"], step["view"]
            assert len(index) == len(view) == BATCH and view.min() >= 0 and view.max() < VIEWS
            # the student saw exactly view (index[b], view[b]) of the images with those dataset indices
            x = augment.normalize(augment.apply(train.images[index], params[index, view]))
            assert torch.equal(step["images"], x), f"rank {rank} step {s}: student input is not the recorded view"
            # (b) the cached logits are a fresh teacher pass on those views, and KD was computed on them
            with torch.no_grad():
                fresh = distiller.teacher_forward(0, x).logits.float()
            torch.testing.assert_close(step["cached"], fresh, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, r=rank, s=s: f"rank {r} step {s}: cached rows are not its views ({m})")
            p_t = F.softmax(fresh / TEMPERATURE, 1)
            log_p_s = F.log_softmax(step["student"] / TEMPERATURE, 1)
            kd = KD_WEIGHT * TEMPERATURE**2 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()
            torch.testing.assert_close(step["kd"], kd, atol=1e-5, rtol=1e-4)
            seen.append(index)
        per_rank.append(torch.cat(seen))
    # each rank read only rows of its own shard: disjoint, and together the whole training set once
    a, b = per_rank
    assert len(set(a.tolist())) == len(a) and len(set(b.tolist())) == len(b)
    assert not set(a.tolist()) & set(b.tolist())
    assert sorted(a.tolist() + b.tolist()) == list(range(TRAIN_SIZE))
    # both views were used (the lookup is by (index, view), not by index alone)
    views = torch.cat([s["view"] for rec in (r0, r1) for s in rec["steps"]])
    assert set(views.tolist()) == set(range(VIEWS))
