"""A split whose class folders differ from the train split's is refused, by name, on every folder path:
decoded into memory, streamed, and packed into shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import make_image_folder

from kdistill.data.folders import load_image_folder
from kdistill.data.shards import pack_folder
from kdistill.data.streaming import scan_folder
from kdistill.utils import ConfigError

DIFFERS = r"has classes that differ from the train split's \(only here: \['class_9'\], missing: \['class_2'\]\)"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = make_image_folder(tmp_path / "images", classes=3, train=2, val=1)
    shutil.move(root / "val" / "class_2", root / "val" / "class_9")
    return root


def test_decoded_and_streamed_splits_name_the_differing_classes(folder: Path, tmp_path: Path) -> None:
    classes = ["class_0", "class_1", "class_2"]
    assert load_image_folder(folder / "train", 16, cache_dir=tmp_path / "c").classes == classes
    with pytest.raises(ConfigError, match=DIFFERS):
        load_image_folder(folder / "val", 16, cache_dir=tmp_path / "c", classes=classes)
    with pytest.raises(ConfigError, match=DIFFERS):
        scan_folder(folder / "val", classes, cache_dir=tmp_path / "c")


def test_packing_refuses_the_split(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=DIFFERS):
        pack_folder(folder, str(tmp_path / "shards"))
