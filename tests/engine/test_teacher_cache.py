"""The teacher-output cache (views keyed by index and crop/flip), its manifest checks and storage
error, the cache as the step's teacher source, and the cache in a real run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import STEP_CLASSES as NUM_CLASSES
from conftest import make_augment, make_data, make_distiller

import kdistill
from kdistill.cli import main
from kdistill.data import ImageTensors
from kdistill.engine.teacher_cache import TeacherCacheError, build_teacher_cache, load_teacher_cache
from kdistill.methods.base import Batch, StepInfo
from kdistill.step import FixedTeachers


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    d, data, aug = make_distiller(), make_data(), make_augment()
    out = tmp_path_factory.mktemp("cache") / "fp32"
    cache = build_teacher_cache(d, data, aug, out, views=3, storage="fp32", batch_size=7, seed=1)
    return d, data, aug, out, cache


def view_by_hand(image: torch.Tensor, dy: int, dx: int, flip: int, pad: int = 4) -> torch.Tensor:
    """An independent crop/flip: zero-pad, slice, mirror."""
    c, h, w = image.shape
    padded = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=image.dtype)
    padded[:, pad:pad + h, pad:pad + w] = image
    out = padded[:, dy:dy + h, dx:dx + w]
    return out.flip(2) if flip else out


def test_cached_logits_equal_a_fresh_teacher_pass_on_the_same_view(built) -> None:
    d, data, aug, _, cache = built
    assert cache.params.shape == (20, 3, 3) and cache.values.shape == (1, 20, 3, NUM_CLASSES)
    idx = torch.tensor([0, 5, 6, 13, 19, 7])
    view = torch.tensor([0, 2, 1, 1, 0, 2])
    params = cache.view_params(idx, view)
    assert params[:, :2].min() >= 0 and params[:, :2].max() <= 8 and set(params[:, 2].tolist()) <= {0, 1}
    for b in range(len(idx)):  # the stored parameters describe the view that BatchAugment produces
        dy, dx, flip = params[b].tolist()
        expected = view_by_hand(data.images[idx[b]], dy, dx, flip)
        assert torch.equal(aug.apply(data.images[idx[b]][None], params[b][None])[0], expected)
    x = aug.normalize(aug.apply(data.images[idx], params))
    d.teachers[0].eval()
    with torch.no_grad():
        fresh = d.teachers[0](x)
    torch.testing.assert_close(cache.logits(0, idx, view), fresh, atol=1e-5, rtol=1e-5)


def test_views_differ_so_an_index_alone_is_not_a_key(built) -> None:
    _, _, _, _, cache = built
    idx = torch.arange(20)
    differ = (cache.params[:, 0] != cache.params[:, 1]).any(1)
    assert differ.sum() >= 15  # 9×9×2 possible views: almost every image has distinct views 0 and 1
    gap = (cache.logits(0, idx, torch.zeros(20, dtype=torch.long)) - cache.logits(0, idx, torch.ones(20, dtype=torch.long))).abs().amax(1)
    assert (gap[differ] > 1e-4).all()


def test_training_batch_pairs_the_student_view_with_its_logits(built) -> None:
    d, data, aug, _, cache = built
    idx = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    images, targets, index = data[idx]
    g = torch.Generator().manual_seed(7)
    batch, outs = cache.training_batch(Batch(images, targets, index), aug, [0], generator=g)
    view = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(7))  # the same draw
    expected_x = aug.normalize(aug.apply(images, cache.view_params(idx, view)))
    torch.testing.assert_close(batch.images, expected_x)
    with torch.no_grad():
        torch.testing.assert_close(outs[0].logits, d.teachers[0].eval()(batch.images), atol=1e-5, rtol=1e-5)
    assert torch.equal(batch.targets, targets) and torch.equal(batch.index, idx)


def test_distill_loss_with_the_cache_equals_the_loss_with_the_teacher(built) -> None:
    d, data, aug, _, cache = built
    idx = torch.arange(2, 12)
    images, targets, index = data[idx]
    batch, outs = cache.training_batch(Batch(images, targets, index), aug, [0], generator=torch.Generator().manual_seed(3))
    d.train()
    info = StepInfo(epoch=0, step=0, max_epochs=1)
    torch.manual_seed(0)
    _, with_cache = d.forward_train(batch, info, teachers=FixedTeachers(outs))
    torch.manual_seed(0)
    _, with_teacher = d.forward_train(batch, info)
    assert with_cache.keys() == with_teacher.keys() == {"ce", "kd"}
    for k in with_cache:
        torch.testing.assert_close(with_cache[k], with_teacher[k], atol=1e-6, rtol=1e-5)
    assert with_cache["kd"] > 0


def test_manifest_rejects_changed_teacher_data_augmentation_and_precision(built) -> None:
    d, data, aug, out, _ = built
    assert load_teacher_cache(out, d, data, aug).views == 3
    other = make_distiller()
    with torch.no_grad():
        other.teachers[0].fc.bias[0] += 1e-3
    with pytest.raises(TeacherCacheError, match=r"teacher 0 \(cifar.resnet8\) has different weights.*rebuild"):
        load_teacher_cache(out, other, data, aug)
    other = make_distiller()
    other.teachers[0].bn1.running_mean.add_(0.01)  # buffers count as weights
    with pytest.raises(TeacherCacheError, match="different weights"):
        load_teacher_cache(out, other, data, aug)
    changed = ImageTensors(data.images.clone(), data.targets.clone())
    changed.images[3, 0, 0, 0] ^= 1
    with pytest.raises(TeacherCacheError, match="another training set"):
        load_teacher_cache(out, d, changed, aug)
    relabelled = ImageTensors(data.images, data.targets.roll(1))
    with pytest.raises(TeacherCacheError, match="another training set"):
        load_teacher_cache(out, d, relabelled, aug)
    with pytest.raises(TeacherCacheError, match="augmentation"):
        load_teacher_cache(out, d, data, make_augment(padding=2))
    d.configure_teachers("bf16")
    try:
        with pytest.raises(TeacherCacheError, match="teacher.precision=32 outputs but the run sets teacher.precision=bf16"):
            load_teacher_cache(out, d, data, aug)
    finally:
        d.configure_teachers("32")
    with pytest.raises(TeacherCacheError, match="no manifest.json"):
        load_teacher_cache(out.parent / "missing", d, data, aug)


def test_feature_methods_cannot_use_a_logit_cache(built, tmp_path: Path) -> None:
    _, data, aug, _, _ = built
    with pytest.raises(TeacherCacheError, match="method 'at' reads teacher features"):
        build_teacher_cache(make_distiller("at"), data, aug, tmp_path / "c", views=1)


def test_fp16_and_topk_storage_error(built, tmp_path: Path) -> None:
    d, data, aug, _, exact = built
    fp16 = build_teacher_cache(d, data, aug, tmp_path / "fp16", views=3, storage="fp16", seed=1)
    assert torch.equal(fp16.params, exact.params) and fp16.values.dtype == torch.float16
    idx, view = torch.arange(20).repeat_interleave(3), torch.arange(3).repeat(20)
    ref, half = exact.logits(0, idx, view), fp16.logits(0, idx, view)
    # round to nearest in float16: relative error at most 2^-11 (normal range), 2^-25 absolute below it
    assert ((half - ref).abs() <= ref.abs() * 2**-11 + 2**-25).all()
    assert (half - ref).abs().max() > 0  # it is a lossy format
    topk = build_teacher_cache(d, data, aug, tmp_path / "topk", views=3, storage="topk", topk=3, seed=1)
    approx = topk.logits(0, idx, view)
    top = ref.topk(3, 1)
    torch.testing.assert_close(approx.gather(1, top.indices), top.values, atol=0, rtol=2**-11)
    rest = ref.scatter(1, top.indices, float("nan"))
    fill = rest.nansum(1) / (NUM_CLASSES - 3)
    others = approx.scatter(1, top.indices, float("nan"))
    torch.testing.assert_close(others.nan_to_num(0), torch.where(rest.isnan(), 0.0, fill[:, None]), atol=2e-3, rtol=2**-10)
    assert torch.equal(approx.argmax(1), ref.argmax(1))
    with pytest.raises(kdistill.utils.ConfigError, match="storage"):
        build_teacher_cache(d, data, aug, tmp_path / "bad", storage="int8")


def test_cache_teacher_and_distill_with_the_cache_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["data.name=synthetic", "data.num_classes=4", "data.train_size=64", "data.val_size=32", "data.image_size=16",
              "data.batch_size=32", "data.eval_batch_size=32", "model=cifar.resnet8", "teacher.model=cifar.resnet8", "teacher.allow_untrained=true",
              "method.name=kd", "trainer.max_epochs=1", "trainer.progress_bar=false"]
    cache = tmp_path / "cache"
    assert main(["cache-teacher", *common, "--views", "2", "--out", str(cache)]) == 0
    assert (cache / "manifest.json").is_file() and "use it with" in capsys.readouterr().out
    assert main(["distill", *common, f"teacher.cache={cache}", f"output={tmp_path / 'run'}"]) == 0
    assert (tmp_path / "run" / "student.safetensors").is_file()
    capsys.readouterr()
    assert main(["distill", *common, "data.train_size=48", f"teacher.cache={cache}", f"output={tmp_path / 'r2'}"]) == 2
    assert "built on another training set" in capsys.readouterr().err


def test_kd_loss_reference_for_cached_logits(built) -> None:
    """KD on cached logits is the textbook T²·KL of the stored view's logits (independent formula)."""
    d, data, aug, _, cache = built
    idx, view = torch.tensor([1, 2, 3]), torch.tensor([2, 0, 1])
    x = aug.normalize(aug.apply(data.images[idx], cache.view_params(idx, view)))
    t = cache.logits(0, idx, view)
    s = torch.randn(3, NUM_CLASSES)
    T = 4.0
    p_t = F.softmax(t / T, 1)
    by_hand = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    losses = d.method(Batch(x, data.targets[idx], idx), kdistill.methods.base.ModelOutput(s),
                      [kdistill.methods.base.ModelOutput(t)], StepInfo())
    torch.testing.assert_close(losses["kd"], 0.9 * by_hand)
