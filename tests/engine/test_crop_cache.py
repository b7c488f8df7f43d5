"""The teacher cache of random resized crops (FKD-style top-k soft labels): the top-k rule by hand, boxes seeded and
recorded with the cache, cached labels equal to a live teacher pass on the same crops, the combinations that cannot be
cached, and the command line (cache-teacher on shards, then distill without any teacher pass)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("litdata")

TRAIN, CLASSES = 48, 4  # the image folder of conftest.make_shard_folder

from kdistill.data.shards import ShardDataset, ShardLoader, open_shards  # noqa: E402
from kdistill.data.transforms import build_transform  # noqa: E402
from kdistill.utils import ConfigError  # noqa: E402


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


def test_crop_cache_boxes_are_seeded_recorded_and_labels_equal_a_live_teacher_pass(packed_shards, tmp_path: Path) -> None:
    from kdistill.data import BatchAugment
    from kdistill.engine.crop_cache import CachedCropTeachers, build_crop_cache, load_crop_cache
    from kdistill.methods.base import Batch

    _, out = packed_shards
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


def test_crop_cache_refuses_feature_methods_and_batch_transforms(packed_shards, tmp_path: Path) -> None:
    from kdistill.data import BatchAugment
    from kdistill.engine.crop_cache import build_crop_cache

    _, out = packed_shards
    norm = BatchAugment([0.5] * 3, [0.25] * 3, padding=0, flip=False)
    with pytest.raises(ConfigError, match="reads teacher features"):
        build_crop_cache(_distiller("fitnet"), _train_split(out), norm, tmp_path / "f")
    cifar = open_shards(str(out), build_transform("cifar", 16))[0]
    with pytest.raises(ConfigError, match="needs data.transform=imagenet"):
        build_crop_cache(_distiller(), cifar, norm, tmp_path / "g")



def test_cache_teacher_on_shards_then_distill_without_teacher_pass(packed_shards, tmp_path: Path, capsys) -> None:
    from kdistill import step
    from kdistill.cli import main

    _, out = packed_shards
    common = ["model=cifar.resnet8", "teacher.model=cifar.resnet8", "method.name=kd", "teacher.allow_untrained=true", "data.name=shards",
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
    # building under torchrun (every rank would label every sample into the same folder) is refused
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert main(["cache-teacher", *common, "--out", str(tmp_path / "cache2")]) == 2
    finally:
        del os.environ["WORLD_SIZE"]
    assert "runs in one process" in capsys.readouterr().err and not (tmp_path / "cache2").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 1
    # a feature method cannot use a logit cache: exit 2 with the reason, before any training
    assert main(["distill", *common, "method.name=fitnet", f"teacher.cache={cache}"]) == 2
    assert "reads teacher features" in capsys.readouterr().err


def test_crop_cache_on_a_streamed_folder_serves_the_crops_its_workers_cut(packed_shards, tmp_path: Path) -> None:
    from kdistill.data import BatchAugment, StreamingFolder, make_loader
    from kdistill.data.streaming import scan_folder
    from kdistill.engine.crop_cache import CachedCropTeachers, build_crop_cache
    from kdistill.methods.base import Batch

    folder, _ = packed_shards
    distiller = _distiller()
    norm = BatchAugment([0.5] * 3, [0.25] * 3, padding=0, flip=False)
    train = StreamingFolder(scan_folder(folder / "train", cache_dir=str(tmp_path)), build_transform("imagenet", 16),
                            True, seed=3, decoder="simplejpeg")
    cache = build_crop_cache(distiller, train, norm, tmp_path / "c", views=2, topk=3, storage="fp32", seed=1)
    train.views = cache.crop_views()
    source, seen = CachedCropTeachers(cache), []
    for epoch in (0, 1):
        loader = make_loader(train, 16, True, seed=3, num_workers=1)
        loader.epoch_batches.set_epoch(epoch)
        for images, targets, index, crops in loader:
            x = norm.normalize(images)
            _, (cached,) = source(Batch(x, targets, index, crops=crops), [0])
            live = distiller.teacher_forward(0, x).logits
            top = live.topk(3, dim=1)
            torch.testing.assert_close(cached.logits.gather(1, top.indices), top.values, rtol=1e-5, atol=1e-5)
            seen += [(epoch, i, int(cache.view_for(index, crops)[k])) for k, i in enumerate(index.tolist())]
    assert sorted(i for e, i, _ in seen if e == 0) == list(range(TRAIN))
    views = {v for _, _, v in seen}
    assert views == {0, 1}  # both stored crops are used, drawn per sample and epoch
