"""Streaming image folders (kdistill.data.streaming) against the in-memory path: same predictions, disjoint DDP
shares, mid-epoch resume after SIGKILL, bad images skipped and counted, ``data.in_memory=auto``."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdistill.cli import main
from kdistill.data import BatchAugment, ImageTensors, MemoryFolder, StreamingFolder, build_data, make_loader
from kdistill.data.streaming import EpochBatches, StreamingLoader, scan_folder
from kdistill.data.transforms import ImageTransform
from kdistill.models import create_model
from kdistill.utils import ConfigError

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.25, 0.25]


def _jpeg_folder(root: Path, classes: int = 2, per_class: int = 6, val_per_class: int = 3, seed: int = 0) -> Path:
    """JPEGs of varied sizes (30-70 px a side, landscape and portrait): smooth colour fields, class-tinted."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = (int(v) for v in torch.randint(30, 71, (2,), generator=g))
                coarse = torch.rand(1, 3, 3, 4, generator=g)
                coarse[0, c % 3] += 0.5
                img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
                hwc = (img[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
                Image.fromarray(hwc, "RGB").save(folder / f"{i:03d}.jpg", quality=90)
    return root


def _predict(val, model, workers: int = 0) -> torch.Tensor:
    aug = BatchAugment(MEAN, STD, padding=0, flip=False)
    with torch.no_grad():
        return torch.cat([model(aug(x, train=False)) for x, _, _ in make_loader(val, 4, False, num_workers=workers)])


@pytest.mark.parametrize(("transform", "size"), [("imagenet", 24), ("cifar", 20)])
def test_streaming_and_in_memory_give_identical_val_predictions(tmp_path: Path, transform: str, size: int) -> None:
    root = _jpeg_folder(tmp_path / "d")
    common = {"name": "imagefolder", "root": str(root), "image_size": size, "transform": transform,
              "cache_dir": str(tmp_path / "cache"), "mean": MEAN, "std": STD}
    memory = build_data(**common, in_memory="true")
    stream = build_data(**common, in_memory="false")
    assert isinstance(memory.val, ImageTensors) and isinstance(stream.val, StreamingFolder)
    assert memory.storage["in_memory"] and not stream.storage["in_memory"]
    assert memory.input_size == stream.input_size == (3, size, size)
    model = create_model("cifar.resnet8", num_classes=2).eval()
    a, b = _predict(memory.val, model), _predict(stream.val, model, workers=2)
    assert a.shape == (6, 2) and torch.equal(a, b)
    # the images themselves: the same decode function on both paths
    streamed = torch.cat([x for x, _, _ in make_loader(stream.val, 4, False)])
    assert torch.equal(streamed, memory.val.images)
    if transform == "imagenet":
        assert isinstance(memory.train, MemoryFolder) and not memory.batch_augment
    else:
        assert isinstance(memory.train, ImageTensors) and memory.batch_augment


def test_random_resized_crops_depend_only_on_seed_epoch_and_index(tmp_path: Path) -> None:
    root = _jpeg_folder(tmp_path / "d", per_class=8)
    files = scan_folder(root / "train", cache_dir=tmp_path / "cache")
    ds = StreamingFolder(files, ImageTransform("imagenet", 16), train=True, seed=3)

    def epoch(loader: StreamingLoader, e: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        loader.epoch_batches.set_epoch(e)
        return {int(i): (x[k], p[k]) for x, _, idx, p in loader for k, i in enumerate(idx)}

    one = epoch(StreamingLoader(ds, 4, True, seed=3, num_workers=0, with_params=True), 1)
    two = epoch(StreamingLoader(ds, 4, True, seed=3, num_workers=2, with_params=True), 1)
    assert sorted(one) == list(range(16))
    for i in one:  # the same crop box, flip and pixels in the main process and in worker processes
        assert torch.equal(one[i][1], two[i][1]) and torch.equal(one[i][0], two[i][0])
    other = epoch(StreamingLoader(ds, 4, True, seed=3, with_params=True), 2)
    assert sum(not torch.equal(one[i][1], other[i][1]) for i in one) >= 14  # a new epoch draws new crops
    w, h = (int(v) for v in files.sizes[5])
    box = one[5][1]
    assert 0 <= box[0] and box[0] + box[2] <= h and 0 <= box[1] and box[1] + box[3] <= w


def test_the_trainer_sets_each_epoch_of_a_streamed_loader(tmp_path: Path) -> None:
    # Lightning starts an epoch by calling set_epoch on loader.sampler and loader.batch_sampler.sampler (the helper
    # below is what its fit loop calls); the streamed loader must take the epoch from there, or every epoch would
    # repeat epoch 0's order and crops
    from lightning.fabric.utilities.data import _set_sampler_epoch

    root = _jpeg_folder(tmp_path / "d", per_class=8)
    ds = StreamingFolder(scan_folder(root / "train", cache_dir=tmp_path / "cache"), ImageTransform("imagenet", 16),
                         train=True, seed=3)
    loader = StreamingLoader(ds, 4, True, seed=3, with_params=True)
    orders = []
    for e in (0, 1):
        _set_sampler_epoch(loader, e)
        assert loader.epoch_batches.epoch == e
        orders.append([(int(i), p[k].tolist()) for _, _, idx, p in loader for k, i in enumerate(idx)])
    assert [i for i, _ in orders[0]] != [i for i, _ in orders[1]]  # a new shuffle
    assert sorted(i for i, _ in orders[1]) == list(range(16))
    boxes = [dict(o) for o in orders]
    assert sum(boxes[0][i] != boxes[1][i] for i in range(16)) >= 14  # and new crops


def test_bad_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _jpeg_folder(tmp_path / "d")
    (root / "val" / "c0" / "zz-broken.jpg").write_bytes(b"not an image")
    good = io.BytesIO()
    Image.frombytes("RGB", (64, 48), bytes(range(256)) * 36).save(good, format="JPEG")
    data = good.getvalue()
    (root / "val" / "c1" / "zz-truncated.jpg").write_bytes(data[: len(data) // 2])  # header intact, data cut
    common = {"name": "imagefolder", "root": str(root), "image_size": 24, "transform": "imagenet",
              "mean": MEAN, "std": STD}
    stream = build_data(**common, in_memory="false", cache_dir=str(tmp_path / "c1"))
    assert stream.skipped == 1 and len(stream.val) == 7  # the header check catches the first
    loader = make_loader(stream.val, 4, False)
    seen = sum(len(t) for _, t, _ in loader)
    assert seen == 6 and loader.bad_images == 1  # the truncated one fails while decoding, is dropped and counted
    memory = build_data(**common, in_memory="true", cache_dir=str(tmp_path / "c2"))
    assert memory.skipped == 2 and len(memory.val) == 6
    cifar = build_data(**{**common, "transform": "cifar"}, in_memory="true", cache_dir=str(tmp_path / "c3"))
    assert cifar.skipped == 2 and len(cifar.val) == 6
    with pytest.raises(ConfigError, match="cannot read image .*zz-broken.jpg"):
        build_data(**common, in_memory="false", cache_dir=str(tmp_path / "c4"), on_bad_image="error")


def test_in_memory_auto_follows_the_budget(tmp_path: Path) -> None:
    root = _jpeg_folder(tmp_path / "d")
    common = {"name": "imagefolder", "root": str(root), "image_size": 24, "transform": "imagenet",
              "cache_dir": str(tmp_path / "c"), "mean": MEAN, "std": STD}
    files = scan_folder(root / "train", cache_dir=tmp_path / "c")
    need_train = int((files.sizes[:, 0] * files.sizes[:, 1]).sum()) * 3  # full-size images for per-sample crops
    fits = build_data(**common, in_memory="auto", memory_budget_gb=1.0)
    assert fits.storage["in_memory"] and fits.storage["decoded_bytes"] == need_train + 6 * 3 * 24 * 24
    tight = build_data(**common, in_memory="auto", memory_budget_gb=(need_train - 1) / 2**30)
    assert not tight.storage["in_memory"] and isinstance(tight.train, StreamingFolder)
    with pytest.raises(ConfigError, match=r"unknown value for data.in_memory 'maybe'"):
        build_data(**common, in_memory="maybe")
    with pytest.raises(ConfigError, match="data.transform=imagenet needs data.name=imagefolder"):
        build_data("synthetic", transform="imagenet", image_size=24)


def _ddp_worker(rank: int, world: int, port: int, root: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    files = scan_folder(Path(root) / "train", cache_dir=cache)
    ds = StreamingFolder(files, ImageTransform("imagenet", 16), train=True, seed=0)
    train = StreamingLoader(ds, 4, True, seed=0, rank=rank, world_size=world, num_workers=1)
    train.epoch_batches.set_epoch(1)
    val_files = scan_folder(Path(root) / "val", files.classes, cache_dir=cache)
    val = StreamingLoader(StreamingFolder(val_files, ImageTransform("imagenet", 16), train=False), 4, False,
                          rank=rank, world_size=world, num_workers=1)
    mine = {"train": [int(i) for _, _, idx in train for i in idx], "val": [int(i) for _, _, idx in val for i in idx]}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_ddp_ranks_stream_disjoint_samples_covering_the_split(tmp_path: Path) -> None:
    import socket

    root = _jpeg_folder(tmp_path / "d", per_class=8, val_per_class=5)  # 16 train (2 ranks × 2 batches of 4), 10 val
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "gathered.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(root), str(tmp_path / "c"), str(out)), nprocs=2)
    ranks = torch.load(out, weights_only=True)
    for split, size in (("train", 16), ("val", 10)):
        a, b = ranks[0][split], ranks[1][split]
        assert not set(a) & set(b), split
        assert sorted(a + b) == list(range(size)), split
        assert len(a) == len(set(a)) and len(b) == len(set(b))


# The run is killed by itself right before its sixth training step (deterministic), after the step-4 checkpoint.
KILLER = """
import os, signal, sys
from kdistill.cli import main
from kdistill.engine.module import DistillModule

step = DistillModule.training_step

def training_step(self, batch, batch_idx):
    if self.global_step == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, batch_idx)

DistillModule.training_step = training_step
sys.exit(main(sys.argv[1:]))
"""


def test_streamed_run_resumes_mid_epoch_after_sigkill(tmp_path: Path) -> None:
    root = _jpeg_folder(tmp_path / "d", classes=2, per_class=24, val_per_class=2)  # 48 images: 8 steps of 6
    recipe = ["train", "model=cifar.resnet8", "data.name=imagefolder", f"data.root={root}", "data.transform=imagenet",
              "data.image_size=16", "data.in_memory=false", "data.num_workers=1", "data.batch_size=6",
              f"data.cache_dir={tmp_path / 'cache'}", "data.mean=[0.5,0.4,0.3]", "data.std=[0.25,0.25,0.25]",
              "trainer.max_epochs=1", "trainer.checkpoint_every_n_steps=2", "trainer.progress_bar=false",
              "optim.lr=0.05", "optim.schedule=constant"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(script), *recipe, f"output={killed}"], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 0  # mid-epoch
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 4, "bad_images": 0}]
    resumed = subprocess.run([sys.executable, "-m", "kdistill.cli", *recipe, f"output={killed}", "--resume"],
                             capture_output=True, text=True, env=env, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert main([*recipe, f"output={straight}"]) == 0
    a = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    # every sample trained on once, in the same order, with the same crops: bit-identical weights
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_gpu_decoder_falls_back_to_the_cpu_and_drops_damaged_files(tmp_path: Path) -> None:
    root = _jpeg_folder(tmp_path / "d", per_class=5)
    good = io.BytesIO()
    Image.frombytes("RGB", (64, 48), bytes(range(256)) * 36).save(good, format="JPEG")
    (root / "train" / "c1" / "zz-truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    files = scan_folder(root / "train", cache_dir=tmp_path / "c")
    t = ImageTransform("imagenet", 20)
    on_gpu = StreamingLoader(StreamingFolder(files, t, True, seed=1, decoder="gpu"), 11, False, with_params=True)
    on_cpu = StreamingLoader(StreamingFolder(files, t, True, seed=1, decoder="simplejpeg", reduce=False), 11, False,
                             with_params=True)
    (x, y, idx, p), (x2, y2, idx2, p2) = next(iter(on_gpu)), next(iter(on_cpu))
    assert x.dtype == torch.uint8 and x.shape == (10, 3, 20, 20) and on_gpu.bad_images == 1
    assert torch.equal(idx, idx2) and torch.equal(p, p2) and torch.equal(y, y2)
    assert (x.float() - x2.float()).abs().mean() < 1.5  # float resize on the device vs uint8 resize on the CPU


def test_epoch_batches_skip_applies_once() -> None:
    sampler = EpochBatches(20, 4, train=True, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip = 3
    assert list(sampler) == full[3:] and list(sampler) == full
    assert all(e == 2 for batch in full for _, e in batch)


def test_data_options_are_checked_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["train", "model=cifar.resnet8", f"output={tmp_path / 'run'}"]
    cases = [
        (["data.transform=imagenett"], r"unknown value for data.transform 'imagenett'.*Did you mean 'imagenet'"),
        (["data.in_memory=sometimes"], r"unknown value for data.in_memory 'sometimes'.*auto, false, true"),
        (["data.decoder=libjpeg"], r"unknown value for data.decoder 'libjpeg'.*simplejpeg"),
        (["data.name=imagefolder", "data.root=x", "data.transform=imagenet"], "needs data.name=imagefolder or shards and data.image_size"),
        (["data.memory_budget_gb=-1"], "data.memory_budget_gb must be >= 0"),
        (["trainer.checkpoint_every_n_steps=0"], "trainer.checkpoint_every_n_steps must be >= 1"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert re.search(message, err), (extra, err)
    assert not (tmp_path / "run").exists()
