"""Packed shards (LitData): packing a folder and reading it back, bad images, DDP ranks and workers reading
disjoint samples, and a training run killed with SIGKILL mid-epoch resuming without repeating or skipping samples."""

from __future__ import annotations

import collections
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("litdata")

from kdistill.data.shards import ShardDataset, ShardLoader, open_shards, pack_folder, read_meta
from kdistill.data.transforms import build_transform
from kdistill.utils import ConfigError

TRAIN, VAL, CLASSES = 48, 10, 4


def make_folder(root: Path) -> Path:
    """Train: 48 JPEGs of varied sizes in 4 classes; val: 9 JPEGs, one PNG and one truncated JPEG."""
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN), ("val", VAL)):
        for i in range(count):
            c = i % CLASSES
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = (int(v) for v in rng.integers(20, 48, 2))
            pixels = (rng.random((h, w, 3)) * 80 + 50 * c).clip(0, 255).astype(np.uint8)
            if split == "val" and i == 3:
                Image.fromarray(pixels).save(d / f"{i:03d}.png")
            else:
                Image.fromarray(pixels).save(d / f"{i:03d}.jpg", quality=90)
    bad = root / "val" / "class1" / "005.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # a JPEG header and nothing else: undecodable
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    folder = make_folder(root / "folder")
    pack_folder(folder, str(root / "packed"), chunk_mb=0.004)  # several chunks per split
    return folder, root / "packed"


def folder_samples(split_dir: Path) -> collections.Counter:
    return collections.Counter((p.read_bytes(), label, i) for i, (p, label) in enumerate(listing(split_dir)))


def test_pack_then_read_back_gives_the_same_bytes_labels_and_indices(packed: tuple[Path, Path]) -> None:
    folder, out = packed
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


def test_bad_images_in_a_shard_are_skipped_and_counted(packed: tuple[Path, Path]) -> None:
    folder, out = packed
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


def test_pack_never_overwrites_and_names_what_is_wrong(packed: tuple[Path, Path], tmp_path: Path) -> None:
    folder, out = packed
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


def test_ddp_ranks_and_workers_read_disjoint_samples_covering_the_split(packed: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = packed
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


# ---- the teacher cache of random resized crops (FKD-style top-k soft labels) ----

def test_topk_rule_by_hand() -> None:
    from kdistill.engine.crop_cache import topk_compress, topk_expand

    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    values, classes, fill = topk_compress(logits, 2)
    assert values.tolist() == [[3.0, 1.0]] and classes.tolist() == [[0, 1]]
    # the other two classes share exp(0) + exp(-1) = 1.3678794 evenly: fill = ln(1.3678794 / 2)
    assert fill.item() == pytest.approx(-0.3798854, abs=1e-6)
    full = topk_expand(values, classes, fill, 4)
    assert full.tolist()[0][:2] == [3.0, 1.0] and full[0, 2:].tolist() == pytest.approx([-0.3798854] * 2, abs=1e-6)
    # the top-k probabilities are the full logits' ones: e^3 / Z, e / Z with Z = e^3 + e + 1 + e^-1 = 24.1716981
    probs = full.softmax(-1)[0]
    assert probs.tolist() == pytest.approx([0.8309531, 0.1124566, 0.0282951, 0.0282951], abs=1e-6)
    assert probs[:2].tolist() == pytest.approx(logits.softmax(-1)[0, :2].tolist(), abs=1e-7)
    with pytest.raises(ConfigError, match=r"--topk must be in \[1, 3\]"):
        topk_compress(logits, 4)


def _distiller(method: str = "kd"):
    import kdistill
    from kdistill.step import Distiller

    torch.manual_seed(0)
    student = kdistill.create_model("cifar.resnet8", num_classes=CLASSES)
    teacher = kdistill.create_model("cifar.resnet8", num_classes=CLASSES)
    m = kdistill.build_method(method, student=student, teachers=[teacher], input_size=(3, 16, 16))
    return Distiller(student, [teacher], m)


def _train_split(out: Path, seed: int = 0) -> ShardDataset:
    return open_shards(str(out), build_transform("imagenet", 16), seed=seed, decoder="pil")[0]


def test_crop_cache_boxes_are_seeded_recorded_and_labels_equal_a_live_teacher_pass(packed, tmp_path: Path) -> None:
    from kdistill.data import BatchAugment
    from kdistill.engine.crop_cache import CachedCropTeachers, build_crop_cache, load_crop_cache
    from kdistill.methods.base import Batch

    _, out = packed
    distiller = _distiller()
    norm = BatchAugment([0.5] * 3, [0.25] * 3, padding=0, flip=False)
    train = _train_split(out)
    a = build_crop_cache(distiller, train, norm, tmp_path / "a", views=3, topk=2, storage="fp32", seed=7)
    b = build_crop_cache(distiller, train, norm, tmp_path / "b", views=3, topk=2, storage="fp32", seed=7)
    c = build_crop_cache(distiller, train, norm, tmp_path / "c", views=3, topk=2, storage="fp32", seed=8)
    assert torch.equal(a.params, b.params) and torch.equal(a.values, b.values)
    assert not torch.equal(a.params, c.params)
    assert a.params.shape == (TRAIN, 3, 5) and a.manifest["seed"] == 7 and a.manifest["views"] == 3
    assert (a.params[..., 2] > 0).all() and set(a.params[..., 4].unique().tolist()) <= {0, 1}
    loaded = load_crop_cache(tmp_path / "a", distiller, train, norm)  # the boxes are stored with the labels
    assert torch.equal(loaded.params, a.params) and torch.equal(loaded.fill, a.fill)

    train.views = loaded.crop_views()
    source = CachedCropTeachers(loaded)
    loader = ShardLoader(train, batch_size=16, num_workers=0, with_params=True)
    seen = 0
    for images, targets, index, crops in loader:
        x = norm.normalize(images)
        _, (cached,) = source(Batch(x, targets, index, crops=crops), [0])
        live = distiller.teacher_forward(0, x).logits
        top = live.topk(2, dim=1)
        assert torch.equal(cached.logits.topk(2, dim=1).indices, top.indices)
        torch.testing.assert_close(cached.logits.gather(1, top.indices), top.values, rtol=1e-5, atol=1e-5)
        rest = live.scatter(1, top.indices, float("-inf")).logsumexp(1) - math.log(CLASSES - 2)
        torch.testing.assert_close(cached.logits.scatter(1, top.indices, 0.0).sum(1) / 2, rest, rtol=1e-5, atol=1e-5)
        seen += len(index)
    assert seen == TRAIN
    # a crop that is not stored is refused
    with pytest.raises(ConfigError, match="none of the 3 crops"):
        source(Batch(x, targets, index, crops=crops + 1), [0])


def test_crop_cache_refuses_feature_methods_and_batch_transforms(packed, tmp_path: Path) -> None:
    from kdistill.data import BatchAugment
    from kdistill.engine.crop_cache import build_crop_cache

    _, out = packed
    norm = BatchAugment([0.5] * 3, [0.25] * 3, padding=0, flip=False)
    with pytest.raises(ConfigError, match="reads teacher features"):
        build_crop_cache(_distiller("fitnet"), _train_split(out), norm, tmp_path / "f")
    cifar = open_shards(str(out), build_transform("cifar", 16))[0]
    with pytest.raises(ConfigError, match="needs data.transform=imagenet"):
        build_crop_cache(_distiller(), cifar, norm, tmp_path / "g")



# ---- a training run on shards killed with SIGKILL mid-epoch, then resumed ----

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


def test_run_killed_mid_epoch_resumes_without_repeating_or_skipping_samples(packed, tmp_path: Path) -> None:
    _, out = packed
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


def test_cache_teacher_on_shards_then_distill_without_teacher_pass(packed, tmp_path: Path, capsys) -> None:
    from kdistill import step
    from kdistill.cli import main

    _, out = packed
    common = ["model=cifar.resnet8", "teacher.model=cifar.resnet8", "method.name=kd", "data.name=shards",
              f"data.root={out}", "data.transform=imagenet", "data.image_size=16", "data.batch_size=16",
              "data.eval_batch_size=16", "trainer.max_epochs=1", "trainer.accelerator=cpu",
              "trainer.progress_bar=false", f"output={tmp_path / 'run'}"]
    cache = tmp_path / "cache"
    assert main(["cache-teacher", *common, "--views", "2", "--topk", "2", "--out", str(cache)]) == 0
    assert "top-2 of crops" in capsys.readouterr().out
    calls = []
    original = step.Distiller.teacher_forward
    step.Distiller.teacher_forward = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        assert main(["distill", *common, f"teacher.cache={cache}"]) == 0
    finally:
        step.Distiller.teacher_forward = original
    assert calls == []  # every training step took the teachers' outputs from the cache
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 1
    # a feature method cannot use a logit cache: exit 2 with the reason, before any training
    assert main(["distill", *common, "method.name=fitnet", f"teacher.cache={cache}"]) == 2
    assert "reads teacher features" in capsys.readouterr().err
