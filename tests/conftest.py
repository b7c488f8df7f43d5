"""Shared fixtures: tiny synthetic data, the shared real data when present."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"


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
