"""Images decode faithfully or are refused (kdistill.data.image_modes, kdistill.data.folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill.data.folders import load_image_folder
from kdistill.data.image_modes import UnsupportedImage, to_rgb
from kdistill.utils import ConfigError


def rgb(im: Image.Image) -> np.ndarray:
    return np.asarray(to_rgb(im))


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 255]], dtype=np.uint16)  # 255 of 65535 is nearly black
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        out = rgb(im)
    assert out.shape == (1, 4, 3) and out[0, :, 0].tolist() == [0, 100, 255, 0]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_integer_and_float_modes() -> None:
    assert rgb(Image.fromarray(np.array([[3, 200]], dtype=np.int32), "I"))[0, :, 0].tolist() == [3, 200]
    assert rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I"))[0, :, 0].tolist() == [0, 255]
    unit = Image.fromarray(np.array([[0.0, 0.25, 1.0]], dtype=np.float32), "F")
    assert rgb(unit)[0, :, 0].tolist() == [0, 64, 255]  # 0.25 * 255 = 63.75
    wide = Image.fromarray(np.array([[0.0, 100.0, 255.0]], dtype=np.float32), "F")
    assert rgb(wide)[0, :, 0].tolist() == [0, 100, 255]
    for bad in (np.array([[-1.0, 0.5]]), np.array([[0.0, 300.0]]), np.array([[np.nan, 0.5]])):
        with pytest.raises(UnsupportedImage):
            to_rgb(Image.fromarray(bad.astype(np.float32), "F"))
    with pytest.raises(UnsupportedImage):
        to_rgb(Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I"))


def test_palette_cmyk_alpha() -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 0), 1)
    assert rgb(pal)[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))
    assert rgb(cmyk)[0, 0].tolist() == [255, 255, 255]  # no ink: white
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert rgb(cmyk)[0, 0].tolist() == [255, 0, 0]  # magenta + yellow: red
    rgba = Image.new("RGBA", (1, 1), (40, 50, 60, 0))
    assert rgb(rgba)[0, 0].tolist() == [40, 50, 60]  # the stored colour; alpha dropped
    la = Image.new("LA", (1, 1), (90, 128))
    assert rgb(la)[0, 0].tolist() == [90, 90, 90]
    premultiplied = Image.new("La", (1, 1), (45, 128))  # premultiplied 90 at alpha 128/255
    assert abs(int(rgb(premultiplied)[0, 0, 0]) - 90) <= 1


def _folder(root: Path, files: dict[str, list[tuple[str, Image.Image | bytes]]]) -> Path:
    for cls, items in files.items():
        (root / cls).mkdir(parents=True)
        for name, item in items:
            if isinstance(item, bytes):
                (root / cls / name).write_bytes(item)
            else:
                item.save(root / cls / name)
    return root


def test_folder_decodes_every_mode_and_counts_refused(tmp_path: Path) -> None:
    gray16 = Image.fromarray(np.full((4, 4), 257 * 77, dtype=np.uint16))
    pal = Image.new("P", (4, 4))
    pal.putpalette([11, 22, 33] * 256)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    rgba = Image.new("RGBA", (4, 4), (1, 2, 3, 10))
    floats = Image.fromarray(np.full((4, 4), 500.0, dtype=np.float32), "F")  # no 8-bit meaning: refused
    root = _folder(tmp_path / "train", {"a": [("g16.png", gray16), ("pal.png", pal)],
                                        "b": [("cmyk.jpg", cmyk.convert("RGB")), ("cmyk.tif", cmyk),
                                              ("rgba.png", rgba), ("bad.tif", floats)]})
    split = load_image_folder(root, cache_dir=tmp_path / "cache")
    assert len(split.skipped) == 1 and split.skipped[0].endswith("bad.tif")
    pixels = [split.tensors.images[i, :, 0, 0].tolist() for i in range(len(split.tensors.targets))]
    assert pixels[0] == [77, 77, 77] and pixels[1] == [11, 22, 33]
    assert pixels[3] == [255, 0, 0] and pixels[4] == [1, 2, 3]
    assert split.tensors.targets.tolist() == [0, 0, 1, 1, 1]


def test_class_with_only_unreadable_images_is_an_error(tmp_path: Path) -> None:
    good = Image.new("RGB", (4, 4), (5, 5, 5))
    root = _folder(tmp_path / "train", {"a": [("ok.png", good)], "b": [("x.png", b"not an image"),
                                                                       ("y.png", b"\x89PNG broken")]})
    with pytest.raises(ConfigError, match=r"every image of class folder\(s\) \['b'\] is unreadable"):
        load_image_folder(root, cache_dir=tmp_path / "cache")


def test_cache_key_includes_on_bad_image(tmp_path: Path) -> None:
    good = Image.new("RGB", (4, 4), (5, 5, 5))
    root = _folder(tmp_path / "train", {"a": [("ok.png", good), ("broken.png", b"\x89PNG no")],
                                        "b": [("ok.png", good)]})
    cache = tmp_path / "cache"
    assert len(load_image_folder(root, cache_dir=cache, on_bad_image="skip").skipped) == 1
    with pytest.raises(ConfigError, match="cannot read image .*broken.png"):
        load_image_folder(root, cache_dir=cache, on_bad_image="error")  # not served from the skip run's cache
    again = load_image_folder(root, cache_dir=cache, on_bad_image="skip")  # the cache still serves skip
    assert len(again.skipped) == 1 and torch.equal(again.tensors.targets, torch.tensor([0, 1]))
