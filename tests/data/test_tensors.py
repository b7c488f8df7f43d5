"""In-memory data: batch augmentation against a per-image reference, sharded sampling, synthetic data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdistill.data import BatchAugment, BatchSampler, ImageTensors, build_data, make_synthetic


def test_batch_crop_and_flip_equal_per_image_reference() -> None:
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    aug = BatchAugment([0.5] * 3, [0.25] * 3, padding=4)
    params = torch.tensor([[0, 0, 0], [8, 8, 1], [3, 5, 0], [4, 4, 1], [1, 7, 1], [8, 0, 0]])
    out = aug.apply(images, params)
    for i in range(6):
        padded = F.pad(images[i], (4, 4, 4, 4))
        dy, dx, flip = params[i].tolist()
        ref = padded[:, dy : dy + 8, dx : dx + 8]
        if flip:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref), i
    assert torch.equal(aug.apply(images, torch.tensor([[4, 4, 0]] * 6)), images)  # centre crop = identity


def test_normalize_and_param_ranges() -> None:
    aug = BatchAugment([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], padding=2)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(aug(x, train=False), torch.ones(1, 3, 2, 2))
    p = aug.sample_params(1000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert p[:, :2].min() == 0 and p[:, :2].max() == 4 and set(p[:, 2].tolist()) == {0, 1}


def test_normalize_bit_identical_to_out_of_place_formula_and_batch_rows() -> None:
    """The in-place normalisation and the index_select gather change no bit of what the engine sees."""
    g = torch.Generator().manual_seed(3)
    mean, std = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]
    aug = BatchAugment(mean, std)
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=g)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x0 = x.clone()
    out = aug(x, train=False)
    assert torch.equal(out, ref) and out.dtype == torch.float32
    assert torch.equal(x, x0)  # the uint8 batch is not modified in place
    data = ImageTensors(torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8, generator=g), torch.arange(20) % 7)
    images, targets, idx = data[[17, 2, 2, 9]]
    assert torch.equal(images, torch.stack([data.images[i] for i in (17, 2, 2, 9)]))
    assert targets.tolist() == [17 % 7, 2, 2, 9 % 7] and idx.tolist() == [17, 2, 2, 9]


def test_sampler_shards_cover_everything_once_per_epoch() -> None:
    shards = [list(BatchSampler(10, 2, shuffle=True, drop_last=False, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 3
    seen = sorted(i for s in shards for b in s for i in b)
    assert set(seen) == set(range(10))
    s = BatchSampler(10, 4, shuffle=True, drop_last=True, seed=0)
    first = list(s)
    s.set_epoch(1)
    assert first != list(s) and len(first) == len(s) == 2


def test_synthetic_is_deterministic_balanced_and_split_disjoint() -> None:
    a = make_synthetic(5, 50, 16, seed=1)
    b = make_synthetic(5, 50, 16, seed=1)
    c = make_synthetic(5, 50, 16, seed=1, split_seed=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert torch.bincount(a.targets).tolist() == [10] * 5
    assert a.images.dtype == torch.uint8 and a.images.shape == (50, 3, 16, 16)


def test_subset_per_class_and_stats() -> None:
    d = ImageTensors(torch.arange(24, dtype=torch.uint8).view(6, 1, 2, 2).repeat(1, 3, 1, 1),
                     torch.tensor([0, 1, 0, 1, 0, 1]))
    s = d.subset_per_class(2, seed=0)
    assert torch.bincount(s.targets).tolist() == [2, 2]
    with pytest.raises(ValueError, match="fewer than per_class=4"):
        d.subset_per_class(4)
    mean, std = d.channel_stats()
    flat = d.images[:, 0].double() / 255
    assert mean[0] == pytest.approx(flat.mean().item()) and std[0] == pytest.approx(flat.std().item())
    # chunking changes nothing, channels are kept apart, and the values are exact: by hand for 0..23
    g = torch.Generator().manual_seed(1)
    r = ImageTensors(torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8, generator=g), torch.zeros(37, dtype=torch.long))
    assert r.channel_stats(chunk=5) == r.channel_stats(chunk=4096)
    ref = r.images.double().div(255).transpose(0, 1).reshape(3, -1)
    assert r.channel_stats()[0] == pytest.approx(ref.mean(1).tolist(), rel=1e-12)
    assert r.channel_stats()[1] == pytest.approx(ref.std(1).tolist(), rel=1e-12)
    assert mean == [11.5 / 255] * 3 and std[0] == pytest.approx((50.0 ** 0.5) / 255, rel=1e-15)  # var(0..23) = 50


def test_build_data_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown data set 'cifar1000'.*cifar100"):
        build_data("cifar1000")
    with pytest.raises(ValueError, match="data.root is required for imagefolder"):
        build_data("imagefolder")


def _write_folder(root, classes=("a", "b"), per_class=3, size=8, bad=False):
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (10 * i, 20, 30)).save(root / split / c / f"{i}.png")
    if bad:
        (root / "train" / classes[0] / "broken.png").write_bytes(b"not an image")


def test_imagefolder_decodes_caches_and_skips_bad_images(tmp_path) -> None:
    _write_folder(tmp_path / "d", bad=True)
    cache = tmp_path / "cache"
    data = build_data("imagefolder", root=str(tmp_path / "d"), cache_dir=str(cache))
    assert data.classes == ["a", "b"] and len(data.train) == 6 and data.skipped == 1
    assert data.train.images[0, :, 0, 0].tolist() == [0, 20, 30]
    assert any(cache.rglob("*.safetensors"))
    again = build_data("imagefolder", root=str(tmp_path / "d"), cache_dir=str(cache))
    assert torch.equal(again.train.images, data.train.images)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        build_data("imagefolder", root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c2"), on_bad_image="error")


def test_imagefolder_empty_class_folder(tmp_path) -> None:
    _write_folder(tmp_path / "d")
    (tmp_path / "d" / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"class folders without images: \['empty'\]"):
        build_data("imagefolder", root=str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
