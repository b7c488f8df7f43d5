"""Packed shards (LitData): packing a folder and reading it back, bad images, DDP ranks and workers reading
disjoint samples, and a training run killed with SIGKILL mid-epoch resuming without repeating or skipping samples.
The image folder and its shards come from ``tests/conftest.py`` (``packed_shards``)."""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("litdata")

TRAIN, VAL, CLASSES = 48, 10, 4  # the image folder of conftest.make_shard_folder

from kdistill.data.shards import ShardDataset, ShardLoader, open_shards, pack_folder, read_meta  # noqa: E402
from kdistill.data.transforms import build_transform  # noqa: E402
from kdistill.utils import ConfigError  # noqa: E402


def folder_samples(split_dir: Path) -> collections.Counter:
    return collections.Counter((p.read_bytes(), label, i) for i, (p, label) in enumerate(listing(split_dir)))


def test_pack_then_read_back_gives_the_same_bytes_labels_and_indices(packed_shards: tuple[Path, Path]) -> None:
    folder, out = packed_shards
    meta = read_meta(str(out))
    assert meta["classes"] == [f"class{c}" for c in range(CLASSES)]
    assert {s: v["count"] for s, v in meta["splits"].items()} == {"train": TRAIN, "val": VAL}
    for split in ("train", "val"):
        chunks = sorted((out / split).glob("chunk-*.bin"))
        assert len(chunks) > 2, "the test should read across several shards"
        ds = ShardDataset(str(out / split), build_transform("imagenet", 16), train=False)
        stored = [ds.raw(i) for i in range(len(ds))]
        got = collections.Counter((bytes(s["image"]), int(s["label"]), int(s["index"])) for s in stored)
        assert got == folder_samples(folder / split)


def listing(split_dir: Path) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in split_dir.iterdir())
    return [(p, label) for label, c in enumerate(classes) for p in sorted((split_dir / c).iterdir())]


def test_bad_images_in_a_shard_are_skipped_and_counted(packed_shards: tuple[Path, Path]) -> None:
    folder, out = packed_shards
    files = listing(folder / "val")
    bad = next(i for i, (p, _) in enumerate(files) if p.name == "005.jpg")
    assert bad == 4  # class1 holds 001, 005, 009: val indices 3, 4, 5
    _, val, _ = open_shards(str(out), build_transform("imagenet", 16))
    loader = ShardLoader(val, batch_size=4)
    rows = [(i, t) for _, targets, index in loader for i, t in zip(index.tolist(), targets.tolist(), strict=True)]
    assert loader.bad_images == 1
    assert sorted(rows) == [(i, label) for i, (_, label) in enumerate(files) if i != bad]
    images, _, _ = next(iter(ShardLoader(val, batch_size=VAL)))
    assert images.dtype == torch.uint8 and images.shape == (VAL - 1, 3, 16, 16)


def test_pack_never_overwrites_and_names_what_is_wrong(packed_shards: tuple[Path, Path], tmp_path: Path) -> None:
    folder, out = packed_shards
    with pytest.raises(ConfigError, match="not empty"):
        pack_folder(folder, str(out))
    with pytest.raises(ConfigError, match="no train/"):
        pack_folder(tmp_path, str(tmp_path / "new"))
    with pytest.raises(ConfigError, match="holds no packed shards"):
        read_meta(str(tmp_path))
    from kdistill.cli import main

    assert main(["pack", str(folder), "--out", str(out)]) == 2


DDP_READER = """
import json, os, sys
import torch.distributed as dist
from kdistill.data.shards import open_shards, ShardLoader
from kdistill.data.transforms import build_transform

dist.init_process_group("gloo")
train, val, _ = open_shards(sys.argv[1], build_transform("imagenet", 16), seed=5)
seen = {}
for name, ds in (("train", train), ("val", val)):
    seen[name] = [[int(i) for i in index] for _, _, index in ShardLoader(ds, batch_size=4, num_workers=2)]
with open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(seen, f)
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_ranks_and_workers_read_disjoint_samples_covering_the_split(packed_shards: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = packed_shards
    script = tmp_path / "reader.py"
    script.write_text(DDP_READER)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output = p.communicate(timeout=120)[0]
        assert p.returncode == 0, output[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train = [sorted(i for batch in r["train"] for i in batch) for r in ranks]
    assert not set(train[0]) & set(train[1])
    assert sorted(train[0] + train[1]) == list(range(TRAIN))
    assert len(train[0]) == len(train[1]) == TRAIN // 2  # equal shares: no rank waits for the other
    val = [i for r in ranks for batch in r["val"] for i in batch]
    assert sorted(val) == sorted(set(range(VAL)) - {4})  # every readable val sample exactly once


def test_a_split_too_small_for_every_rank_to_get_a_batch_is_refused(packed_shards: tuple[Path, Path]) -> None:
    from kdistill.data.shards import make_shard_loader

    _, out = packed_shards
    train, val, _ = open_shards(str(out), build_transform("imagenet", 16))
    # 10 val samples, 2 ranks: batches of 8 would give rank 0 nothing and rank 1 all ten
    with pytest.raises(ConfigError, match=r"10 evaluation samples in batches of 8 .* set data.eval_batch_size to at most 5"):
        make_shard_loader(val, 8, rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"48 training samples in batches of 32 .* data.batch_size to at most 24"):
        make_shard_loader(train, 32, rank=1, world_size=2)
    shares = [[i for _, _, index in make_shard_loader(val, 5, rank=r, world_size=2) for i in index.tolist()]
              for r in range(2)]
    assert all(shares) and sorted(shares[0] + shares[1]) == sorted(set(range(VAL)) - {4})
    assert len(make_shard_loader(val, 16, rank=0, world_size=1)) == 1  # one process takes any batch size


RECORDER = """
import json, os, signal, sys
from kdistill.engine import module

kill_at = int(os.environ.get("KILL_AT_STEP", "-1"))
log = open(sys.argv[1], "a")
train_step = module.DistillModule.training_step


def recording_step(self, batch, batch_idx):
    if self.global_step == kill_at:  # the checkpoint of the previous step is on disk
        os.kill(os.getpid(), signal.SIGKILL)
    loss = train_step(self, batch, batch_idx)
    log.write(json.dumps({"epoch": self.current_epoch, "index": batch.index.tolist()}) + "\\n")
    log.flush()
    return loss


module.DistillModule.training_step = recording_step
from kdistill.cli import main

sys.exit(main(sys.argv[2:]))
"""


def test_run_killed_mid_epoch_resumes_without_repeating_or_skipping_samples(packed_shards, tmp_path: Path) -> None:
    _, out = packed_shards
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    record = tmp_path / "seen.jsonl"
    args = ["train", "model=cifar.resnet8", "data.name=shards", f"data.root={out}", "data.transform=imagenet",
            "data.image_size=16", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=2",
            "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.progress_bar=false",
            "trainer.checkpoint_every_n_steps=1", f"output={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, str(script), str(record), *args], env={**env, "KILL_AT_STEP": "3"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    before = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(before) == 3  # of the epoch's 6 batches of 8
    resumed = subprocess.run([sys.executable, str(script), str(record), *args, "--resume"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(rows) == 6 and {r["epoch"] for r in rows} == {0}
    seen = [i for r in rows for i in r["index"]]
    assert sorted(seen) == list(range(TRAIN)), "repeated or skipped samples"
    assert seen != sorted(seen)  # shuffled
