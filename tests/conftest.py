"""Shared fixtures: tiny synthetic data, the shared real data when present."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from kdistill.data import BatchAugment, ImageTensors
    from kdistill.step import Distiller

SHARED = Path(__file__).resolve().parents[2] / "shared"


# One intra-op thread for the whole suite, in this process and in every subprocess it starts: tiny models
# run fastest that way on a shared 2-core machine, and the seeded resume tests compare in-process and
# subprocess runs bit for bit, which holds only when both reduce with the same thread count.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny100-32`` unpacked once per session into a temporary cache (skips if absent)."""
    archive = SHARED / "data" / "tiny100-32.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real data not available: {archive} is missing")
    root = tmp_path_factory.mktemp("data")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root / "tiny100-32"


SHARD_TRAIN, SHARD_VAL, SHARD_CLASSES = 48, 10, 4


def make_shard_folder(root: Path) -> Path:
    """An image folder for the shard tests. Train: 48 JPEGs of varied sizes in 4 classes; val: 8 JPEGs, one PNG
    and one truncated JPEG (``val/class1/005.jpg``, val index 4)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", SHARD_TRAIN), ("val", SHARD_VAL)):
        for i in range(count):
            c = i % SHARD_CLASSES
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


@pytest.fixture(scope="session")
def packed_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(image folder, its LitData shards)``, packed once per session in chunks of 4 KiB (several per split)."""
    pytest.importorskip("litdata")
    from kdistill.data.shards import pack_folder

    root = tmp_path_factory.mktemp("shards")
    folder = make_shard_folder(root / "folder")
    pack_folder(folder, str(root / "packed"), chunk_mb=0.004)
    return folder, root / "packed"


def make_image_folder(root: Path, classes: int = 3, train: int = 8, val: int = 4, size: int = 20,
                      ext: str = "png") -> Path:
    """A small image folder (train/ and val/, one folder per class) of PNGs whose colour depends on the class,
    at ``size`` pixels (other than the 16-pixel runs that read it, so resizing is exercised)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                base = np.zeros((size, size, 3))
                base[..., c % 3] = 160
                pixels = (base + rng.normal(0, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i:03d}.{ext}")
    return root


# --- a tiny distiller, data and augmentation for the step and teacher-cache tests ---

STEP_CLASSES = 10


def make_distiller(method: str = "kd", seed: int = 0) -> Distiller:
    """A cifar.resnet8 student and teacher (teacher BatchNorm statistics randomised, so a changed buffer
    changes its outputs) with ``method`` built for 3x16x16 inputs."""
    import kdistill
    from kdistill.methods import build_method
    from kdistill.step import Distiller

    torch.manual_seed(seed)
    student = kdistill.create_model("cifar.resnet8", num_classes=STEP_CLASSES)
    teacher = kdistill.create_model("cifar.resnet8", num_classes=STEP_CLASSES)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    m = build_method(method, student=student, teachers=[teacher], input_size=(3, 16, 16))
    return Distiller(student, [teacher], m).train()


def make_data(n: int = 20, seed: int = 0) -> ImageTensors:
    """``n`` random uint8 16x16 images with labels in ``range(STEP_CLASSES)``."""
    from kdistill.data import ImageTensors

    g = torch.Generator().manual_seed(seed)
    return ImageTensors(torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g),
                        torch.randint(0, STEP_CLASSES, (n,), generator=g))


def make_augment(padding: int = 4) -> BatchAugment:
    """CIFAR-style pad-crop-flip with fixed normalisation."""
    from kdistill.data import BatchAugment

    return BatchAugment([0.5, 0.4, 0.3], [0.25, 0.2, 0.3], padding=padding, flip=True)


def subprocess_env() -> dict[str, str]:
    """The environment of a ``kdistill`` subprocess in a test: one thread, no warnings on stderr."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def kdistill_command(argv: list[str], out: Path) -> list[str]:
    """``python -m kdistill.cli <argv> output=<out>`` with this interpreter."""
    import sys

    return [sys.executable, "-m", "kdistill.cli", *argv, f"output={out}"]


def kill_at_first_checkpoint(argv: list[str], out: Path, timeout: float = 120) -> Path:
    """Start ``kdistill <argv> output=<out>`` in a subprocess, SIGKILL it as soon as its first
    ``checkpoints/last.ckpt`` appears, and return that checkpoint's path (the run must not have finished)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(kdistill_command(argv, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=subprocess_env())
    last = out / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + timeout
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert last.exists(), f"no checkpoint appeared; exit {proc.poll()}: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "student.safetensors").exists(), "the run finished before the kill"
    return last
