"""The random-resized-crop teacher cache under DDP: ``kdistill cache-teacher`` builds it once (one process, every
training sample), then a two-process CPU (gloo) ``distill`` run launched with torchrun reads it, each rank seeing a
disjoint share of the samples (LitData shards, or a streamed image folder).

Each rank records, for every training step, the epoch, the dataset indices of its batch, the crop boxes its workers
cut and the logits the cache handed to the method. The test checks that no teacher pass ran, that the ranks' samples
are disjoint and cover the split in every epoch, that every crop is the stored crop ``view_of(seed, epoch, index)``
(read by dataset index, never by a rank-local position) with that crop's stored labels, and that a one-process run
of the same command gives every (epoch, sample) the same crop and the same cached logits: which crop a sample
trains on is a function of the seed, the epoch and the sample, not of the number of processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("litdata")

from kdistill.cli import main
from kdistill.engine.crop_cache import topk_expand, view_of

TRAIN, CLASSES, VIEWS, TOPK, BATCH, EPOCHS = 48, 4, 2, 2, 8, 2  # the image folder of conftest.make_shard_folder

DRIVER = """
import os, sys
import torch
from kdistill.engine import module
from kdistill.engine.crop_cache import CachedCropTeachers
from kdistill.step import Distiller

steps, teacher_calls = [], []
train_step, lookup, teacher_forward = (module.DistillModule.training_step, CachedCropTeachers.__call__,
                                       Distiller.teacher_forward)


def recording_step(self, batch, batch_idx):
    steps.append({"epoch": self.current_epoch, "index": batch.index.cpu().clone(), "crops": batch.crops.cpu().clone()})
    return train_step(self, batch, batch_idx)


def recording_lookup(self, batch, selected):
    out, outputs = lookup(self, batch, selected)
    steps[-1]["cached"] = outputs[0].logits.detach().cpu().clone()
    return out, outputs


def counting_teacher_forward(self, i, images):
    teacher_calls.append(i)
    return teacher_forward(self, i, images)


module.DistillModule.training_step = recording_step
CachedCropTeachers.__call__ = recording_lookup
Distiller.teacher_forward = counting_teacher_forward
from kdistill.cli import main

code = main(sys.argv[2:])
torch.save({"steps": steps, "teacher_calls": len(teacher_calls)},
           os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', '0')}.pt"))
sys.exit(code)
"""


def _common(source: str, folder: Path, shards: Path) -> list[str]:
    data = ["data.name=shards", f"data.root={shards}"] if source == "shards" else \
        ["data.name=imagefolder", f"data.root={folder}", "data.in_memory=false"]
    return [*data, "model=cifar.resnet8", "teacher.model=cifar.resnet8", "teacher.allow_untrained=true",
            "method.name=kd", "data.transform=imagenet", "data.image_size=16", f"data.batch_size={BATCH}",
            "data.eval_batch_size=4", "data.num_workers=1", f"trainer.max_epochs={EPOCHS}", "trainer.accelerator=cpu",
            "trainer.progress_bar=false", "seed=3"]


def _run(driver: Path, records: Path, args: list[str], processes: int) -> list[dict]:
    records.mkdir()
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([*launcher, str(driver), str(records), "distill", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=records)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return [torch.load(records / f"rank{r}.pt") for r in range(processes)]


def _per_sample(steps: list[dict]) -> dict[tuple[int, int], tuple[list[int], torch.Tensor]]:
    """``(epoch, dataset index) -> (crop box, cached logits)`` over all of a rank's steps."""
    out = {}
    for step in steps:
        for b, index in enumerate(step["index"].tolist()):
            key = (step["epoch"], index)
            assert key not in out, f"sample {index} trained twice in epoch {step['epoch']} on one rank"
            out[key] = (step["crops"][b].round().long().tolist(), step["cached"][b])
    return out


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_crop_cache_under_ddp_serves_each_rank_its_own_samples_as_one_process_does(
        packed_shards: tuple[Path, Path], tmp_path: Path, source: str) -> None:
    from safetensors.torch import load_file

    folder, shards = packed_shards
    common = _common(source, folder, shards)
    cache = tmp_path / "cache"
    assert main(["cache-teacher", *common, f"output={tmp_path / 'build'}", "--views", str(VIEWS), "--topk", str(TOPK),
                 "--storage", "fp32", "--out", str(cache)]) == 0
    stored = load_file(str(cache / "tensors.safetensors"))
    params, values, classes, fill = stored["params"], stored["values"], stored["classes"], stored["fill"]
    assert params.shape == (TRAIN, VIEWS, 5) and (params[..., 2] > 0).all()  # every training image has its crops

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ddp = _run(driver, tmp_path / "ddp", [*common, "trainer.devices=2", "trainer.strategy=ddp",
                                          f"teacher.cache={cache}", f"output={tmp_path / 'ddp-run'}"], 2)
    single = _run(driver, tmp_path / "single", [*common, "trainer.devices=1", f"teacher.cache={cache}",
                                                f"output={tmp_path / 'single-run'}"], 1)

    assert [r["teacher_calls"] for r in ddp] == [0, 0] and single[0]["teacher_calls"] == 0
    ranks = [_per_sample(r["steps"]) for r in ddp]
    for epoch in range(EPOCHS):
        shares = [sorted(i for e, i in rank if e == epoch) for rank in ranks]
        assert not set(shares[0]) & set(shares[1]), f"epoch {epoch}: both ranks trained on {set(shares[0]) & set(shares[1])}"
        assert sorted(shares[0] + shares[1]) == list(range(TRAIN)), f"epoch {epoch}: the ranks do not cover the split"
        assert len(shares[0]) == len(shares[1]) == TRAIN // 2

    one = _per_sample(single[0]["steps"])
    assert sorted(one) == [(e, i) for e in range(EPOCHS) for i in range(TRAIN)]
    views_used = set()
    for rank, samples in enumerate(ranks):
        for (epoch, index), (crop, cached) in samples.items():
            view = view_of(3, epoch, index, VIEWS)
            views_used.add(view)
            assert crop == params[index, view].tolist(), f"rank {rank}: sample {index} epoch {epoch} cut another crop"
            expected = topk_expand(values[0, index, view], classes[0, index, view], fill[0, index, view], CLASSES)
            torch.testing.assert_close(cached, expected, rtol=0, atol=0)
            # the one-process run gave this sample in this epoch the same crop and the same labels
            assert one[(epoch, index)][0] == crop
            torch.testing.assert_close(one[(epoch, index)][1], cached, rtol=0, atol=0)
    assert views_used == set(range(VIEWS))
