"""ReviewKD for detection: FPN levels and ABFs, the loss dict, teacher isolation, one batch for two
networks, lifecycle, COCO data and evaluation. Random init, CPU, 96-160 px, batch 2."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from kdistill.detection import (
    CocoDetectionData,
    ReviewKDDetection,
    SyntheticShapesCOCO,
    build_detector,
    check_targets,
    coco_evaluate,
    collate,
    load_detector_weights,
    segmentation_to_mask,
    targets_to_coco,
)
from kdistill.methods.reviewkd import ABF
from kdistill.utils import ConfigError

pytest.importorskip("pycocotools", reason="detection data and evaluation need pycocotools (kdistill[detection])")

SHARED = Path(__file__).resolve().parents[2] / "shared"
RCNN_SIZES = {"0": (32, 40), "1": (16, 20), "2": (8, 10), "3": (4, 5), "pool": (2, 3)}
RETINA_SIZES = {"0": (16, 20), "1": (8, 10), "2": (4, 5), "p6": (2, 3), "p7": (1, 2)}
SMALL = {"min_size": 128, "max_size": 160}


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any attempt to fetch weights fails loudly; TORCH_HOME points to an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to download weights: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def det(name: str, **kw) -> torch.nn.Module:
    kw.setdefault("zero_init_residual", True)
    return build_detector(name, 4, slim=True, **{**SMALL, **kw})


def batch(n: int = 2, seed: int = 0, size=((100, 128), (110, 160))):
    ds = SyntheticShapesCOCO(n, image_size=size, num_classes=3, seed=seed)
    return collate([ds[i] for i in range(n)])


def sizes(model: torch.nn.Module, hw=(128, 160)) -> dict[str, tuple[int, int]]:
    return {k: v[1:] for k, v in ReviewKDDetection._probe(model.backbone, hw).items()}


def hcl_by_hand(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Independent HCL of one level: MSE plus halving weights for pooled 4, 2, 1 (skipped when l >= h)."""
    loss, weight, tau = ((s - t) ** 2).mean(), 1.0, 1.0
    for level in (4, 2, 1):
        if level >= s.shape[-2]:
            continue
        weight /= 2
        loss = loss + weight * ((F.adaptive_avg_pool2d(s, level) - F.adaptive_avg_pool2d(t, level)) ** 2).mean()
        tau += weight
    return loss / tau, tau


# --- levels and ABF structure ----------------------------------------------------------------------
def test_every_paper_pair_has_matching_five_level_pyramids():
    rcnn = {n: sizes(det(f"fasterrcnn_{n}_fpn")) for n in ("resnet18", "resnet34", "resnet50", "resnet101",
                                                             "mobilenet_v2")}
    for name, got in rcnn.items():
        assert got == RCNN_SIZES, name
        assert list(got) == ["0", "1", "2", "3", "pool"]
    retina = [sizes(det(f"retinanet_resnet{d}_fpn", p6p7_from=src)) for d in (50, 101) for src in ("c5", "p5")]
    for got in retina:
        assert got == RETINA_SIZES and list(got) == ["0", "1", "2", "p6", "p7"]


def test_abf_chain_structure_parameter_counts_and_output_shapes():
    d = ReviewKDDetection(det("fasterrcnn_resnet18_fpn"), det("fasterrcnn_resnet34_fpn"), probe_size=(128, 160))
    assert len(d.abfs) == 5
    assert d.abfs[0].att_conv is None and all(a.att_conv is not None for a in d.abfs[1:])
    counts = [sum(p.numel() for p in a.parameters()) for a in d.abfs]
    assert counts == [656_384] + [657_410] * 4 and d.extra_parameters() == 3_286_024
    maps = [torch.randn(2, 256, h, w) for h, w in RCNN_SIZES.values()]
    outs = d.review(maps)
    assert [tuple(o.shape) for o in outs] == [(2, 256, h, w) for h, w in RCNN_SIZES.values()]
    three = ReviewKDDetection(det("fasterrcnn_resnet18_fpn"), det("fasterrcnn_resnet18_fpn"),
                              level_map=[("1", "1"), ("3", "3"), ("pool", "pool")], probe_size=(128, 160))
    assert three.extra_parameters() == 1_971_204


@pytest.mark.parametrize("x_hw,res_hw", [((4, 5), (2, 3)), ((2, 3), (1, 2))])
def test_residual_is_resized_to_the_level_and_zero_attention_averages(x_hw, res_hw):
    abf = ABF(256, 256, 256, fuse=True).eval()
    torch.nn.init.zeros_(abf.att_conv[0].weight)
    torch.nn.init.zeros_(abf.att_conv[0].bias)
    x, residual = torch.randn(2, 256, *x_hw), torch.randn(2, 256, *res_hw)
    out, fused = abf(x, residual)
    y = F.interpolate(residual, size=x_hw, mode="nearest")
    assert fused.shape[-2:] == x_hw and out.shape == (2, 256, *x_hw)
    torch.testing.assert_close(fused, 0.5 * abf.conv1(x) + 0.5 * y, atol=1e-6, rtol=0)


def test_mismatched_pyramids_need_a_level_map():
    student = build_detector("torchvision.fasterrcnn_mobilenet_v3_large_fpn", 4, **SMALL)
    teacher = det("fasterrcnn_resnet18_fpn")
    with pytest.raises(ConfigError, match=r"student has 3 FPN levels and the teacher 5.*level_map"):
        ReviewKDDetection(student, teacher)
    d = ReviewKDDetection(student, teacher, level_map=[("0", "3"), ("1", "3"), ("pool", "pool")])
    assert len(d.abfs) == 3 and [lv[:2] for lv in d.levels] == [("0", "3"), ("1", "3"), ("pool", "pool")]
    with pytest.raises(ConfigError, match="same height and width"):
        ReviewKDDetection(student, teacher, level_map=[("0", "2"), ("pool", "pool")])


def test_size_mismatch_at_forward_raises_instead_of_resizing():
    d = ReviewKDDetection(det("fasterrcnn_resnet18_fpn"), det("fasterrcnn_resnet18_fpn"), probe_size=(128, 160))
    s = {k: torch.randn(2, 256, h, w) for k, (h, w) in RCNN_SIZES.items()}
    t = dict(s, **{"2": torch.randn(2, 256, 9, 10)})
    with pytest.raises(RuntimeError, match="student level 2 is 8x10 but teacher level 2 is 9x10"):
        d.review_loss(s, t)


# --- loss dict and values ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,keys", [
    ("fasterrcnn", {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}),
    ("maskrcnn", {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"}),
    ("retinanet", {"classification", "bbox_regression"}),
])
def test_loss_dict_is_the_students_plus_the_review_loss_of_hand_computed_hcl(kind, keys):
    student, teacher = det(f"{kind}_resnet18_fpn"), det(f"{kind}_resnet34_fpn")
    d = ReviewKDDetection(student, teacher, loss_weight=1.5, probe_size=(128, 160)).train()
    seen: dict[str, dict] = {}
    student.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("s", o))
    teacher.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("t", o))
    images, targets = batch(size=(128, 160))
    losses = d(images, targets)
    assert set(losses) == keys | {"loss_reviewkd"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    outs = d.review([seen["s"][s] for s, *_ in d.levels])
    parts = [hcl_by_hand(o.detach(), seen["t"][t]) for o, (_, t, *_) in zip(outs, d.levels, strict=True)]
    expected_tau = [1.875, 1.875, 1.875, 1.75, 1.5] if kind != "retinanet" else [1.875, 1.875, 1.75, 1.5, 1.0]
    assert [tau for _, tau in parts] == expected_tau
    torch.testing.assert_close(losses["loss_reviewkd"].detach(), 1.5 * sum(v for v, _ in parts), atol=1e-6, rtol=1e-5)
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.abfs.parameters())


def test_student_losses_are_unchanged_by_the_distiller_with_multiscale_training():
    images, targets = batch()
    student = det("fasterrcnn_resnet18_fpn", min_size=(96, 112, 128))
    torch.manual_seed(3)
    plain = student.train()(images, targets)
    d = ReviewKDDetection(student, det("fasterrcnn_resnet18_fpn", min_size=(96, 112, 128)))
    sizes_seen = []
    student.transform.register_forward_hook(lambda m, i, o: sizes_seen.append(o[0].image_sizes))
    teacher_in, student_in = [], []
    d.teacher.backbone.register_forward_pre_hook(lambda m, a: teacher_in.append(a[0].shape))
    student.backbone.register_forward_pre_hook(lambda m, a: student_in.append(a[0].shape))
    torch.manual_seed(3)
    distilled = d.train()(images, targets)
    for key, value in plain.items():
        assert torch.equal(value, distilled[key]), key
    torch.manual_seed(3)
    student.transform(images, targets)
    assert len(sizes_seen) == 2 and sizes_seen[0] == sizes_seen[1]
    assert teacher_in == student_in[:1]


def test_zero_weight_gives_zero_loss_and_zero_abf_gradients():
    d = ReviewKDDetection(det("fasterrcnn_resnet18_fpn"), det("fasterrcnn_resnet18_fpn"), loss_weight=0.0).train()
    losses = d(*batch())
    assert losses["loss_reviewkd"].item() == 0.0
    losses["loss_reviewkd"].backward()
    assert all(p.grad is None or not p.grad.any() for p in d.abfs.parameters())


# --- teacher isolation and gradients ------------------------------------------------------------------
def test_teacher_never_changes_and_gets_no_gradient():
    teacher = det("fasterrcnn_resnet18_fpn", norm="batchnorm")
    before = copy.deepcopy(teacher.state_dict())
    d = ReviewKDDetection(det("fasterrcnn_resnet18_fpn"), teacher, probe_size=(128, 160))
    d.train()
    assert teacher.training is False and not any(m.training for m in teacher.modules())
    params = list(d.trainable_parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in params}
    assert not teacher_ids & {id(p) for p in d.parameters()} and not any(k.startswith("teacher") for k in d.state_dict())
    opt = torch.optim.SGD(params, lr=0.1)
    sum(d(*batch()).values()).backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_review_loss_alone_trains_backbone_fpn_and_abfs_only():
    student = det("fasterrcnn_resnet18_fpn", zero_init_residual=False)
    d = ReviewKDDetection(student, det("fasterrcnn_resnet18_fpn")).train()
    d(*batch())["loss_reviewkd"].backward()
    named = dict(student.named_parameters())
    assert named["backbone.body.layer4.0.conv1.weight"].grad.abs().sum() > 0
    assert named["backbone.fpn.layer_blocks.0.0.weight"].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in d.abfs.named_parameters() if "att" not in n)
    assert all(p.grad is None for n, p in named.items() if n.startswith(("rpn.", "roi_heads.")))
    # trainable_layers=3: stem and layer1 frozen
    assert all(p.grad is None and not p.requires_grad for n, p in named.items()
               if n.startswith(("backbone.body.conv1", "backbone.body.layer1")))


def test_inference_mode_teacher_gives_the_no_grad_loss():
    student, teacher = det("fasterrcnn_resnet18_fpn"), det("fasterrcnn_resnet18_fpn")
    images, targets = batch()
    values = []
    for mode in ("no_grad", "inference"):
        torch.manual_seed(0)
        d = ReviewKDDetection(student, teacher, teacher_grad_mode=mode).train()
        torch.manual_seed(1)
        loss = d(images, targets)["loss_reviewkd"]
        loss.backward()
        values.append(loss.item())
    assert values[0] == values[1]


# --- one batch for both networks ------------------------------------------------------------------------
def test_identity_adapter_passes_the_students_tensor_itself():
    student = det("fasterrcnn_resnet18_fpn")
    d = ReviewKDDetection(student, det("fasterrcnn_resnet18_fpn")).train()
    seen = {}
    student.transform.register_forward_hook(lambda m, i, o: seen.__setitem__("s", o[0].tensors))
    d.teacher.backbone.register_forward_pre_hook(lambda m, a: seen.__setitem__("t", a[0]))
    d(*batch())
    assert d.identity_input and seen["t"] is seen["s"]


def test_teacher_statistics_adapter_matches_the_teachers_own_transform_and_zeroes_padding():
    mean, std = [0.3, 0.5, 0.7], [0.2, 0.25, 0.3]
    student = det("fasterrcnn_resnet18_fpn")
    d = ReviewKDDetection(student, det("fasterrcnn_resnet18_fpn", image_mean=mean, image_std=std))
    assert not d.identity_input
    images, _ = batch(size=((100, 120), (110, 150)))
    student.eval()
    image_list, _ = student.transform(images)
    got = d.teacher_input(image_list.tensors, image_list.image_sizes)
    ref = GeneralizedRCNNTransform(128, 160, mean, std).eval()(images)[0]
    for i, (h, w) in enumerate(image_list.image_sizes):
        torch.testing.assert_close(got[i, :, :h, :w], ref.tensors[i, :, :h, :w], atol=1e-5, rtol=0)
        assert not got[i, :, h:, :].any() and not got[i, :, :, w:].any()
    flipped = ReviewKDDetection(student, d.teacher, teacher_mean=mean, teacher_std=std,
                                teacher_input_fn=lambda x: x.flip(1))
    got = flipped.teacher_input(image_list.tensors, image_list.image_sizes)
    raw = image_list.tensors * d._s_std + d._s_mean
    h, w = image_list.image_sizes[0]
    expected = (raw.flip(1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(got[0, :, :h, :w], expected[0, :, :h, :w], atol=1e-5, rtol=0)


# --- lifecycle ------------------------------------------------------------------------------------------
def test_eval_returns_the_students_predictions_without_running_the_teacher(tmp_path):
    student = det("maskrcnn_resnet18_fpn", box_detections_per_img=5)
    d = ReviewKDDetection(student, det("maskrcnn_resnet18_fpn"))
    calls = []
    d.teacher.backbone.register_forward_hook(lambda *a: calls.append(1))
    images, targets = batch()
    d.train()(images, targets)
    assert len(calls) == 1
    d.eval()
    with torch.no_grad():
        got, ref = d(images), student.eval()(images)
    assert len(calls) == 1
    for a, b in zip(got, ref, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels", "masks"))
    assert not student._forward_hooks and not student.transform._forward_hooks and not student.backbone._forward_hooks
    torch.save(student, tmp_path / "student.pt")
    assert set(student.state_dict()) == set(det("maskrcnn_resnet18_fpn").state_dict())
    assert not any(k.startswith(("teacher", "_teacher")) for k in d.state_dict())


def test_a_one_by_one_level_with_batch_one_explains_the_batchnorm_limit():
    d = ReviewKDDetection(det("retinanet_resnet18_fpn", min_size=100, max_size=100),
                          det("retinanet_resnet18_fpn", min_size=100, max_size=100), probe_size=(128, 128)).train()
    images, targets = batch(1, size=(100, 100))
    with pytest.raises(ValueError, match="level p7 is 1x1 with a batch of 1.*batch >= 2"):
        d(images, targets)


# --- data and evaluation ------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_format", ["polygon", "rle"])
def test_synthetic_set_is_deterministic_and_self_consistent(mask_format):
    ds = SyntheticShapesCOCO(6, image_size=((96, 150), (96, 160)), mask_format=mask_format, seed=5)
    coco = ds.to_coco_dict()
    shapes = set()
    for i in range(len(ds)):
        image, target = ds[i]
        image2, target2 = ds[i]
        assert torch.equal(image, image2) and all(torch.equal(target[k], target2[k]) for k in target)
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        shapes.add(tuple(image.shape[1:]))
        anns = [a for a in coco["annotations"] if a["image_id"] == i + 1]
        for j, mask in enumerate(target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            extent = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            assert target["boxes"][j].tolist() == extent
            assert target["area"][j].item() == mask.sum().item()
            decoded = segmentation_to_mask(anns[j]["segmentation"], *mask.shape)
            assert np.array_equal(decoded, mask.numpy())
    assert any(h % 32 or w % 32 for h, w in shapes) and len(shapes) > 1


def _written_set(tmp_path: Path) -> Path:
    ds = SyntheticShapesCOCO(4, image_size=(96, 120), seed=2)
    ann_path = ds.write(tmp_path)
    coco = json.loads(ann_path.read_text())
    first = coco["annotations"][0]
    coco["annotations"] += [
        {**first, "id": 1000, "iscrowd": 1},
        {**first, "id": 1001, "bbox": [10.0, 10.0, 0.0, 5.0]},
    ]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 4]
    ann_path.write_text(json.dumps(coco))
    return ann_path


def test_coco_folder_converts_boxes_masks_and_drops_crowd_and_degenerate(tmp_path):
    ann_path = _written_set(tmp_path)
    data = CocoDetectionData(tmp_path / "images", ann_path)
    synthetic = SyntheticShapesCOCO(4, image_size=(96, 120), seed=2)
    assert len(data) == 4 and data.num_classes == 4
    for i in range(3):
        image, target = data[i]
        ref_image, ref = synthetic[i]
        assert torch.equal(image, ref_image)
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert target["masks"].dtype == torch.uint8
        assert torch.equal(target["boxes"], ref["boxes"]) and torch.equal(target["masks"], ref["masks"])
    empty = data[3][1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 96, 120)
    assert len(CocoDetectionData(tmp_path / "images", ann_path, train=True)) == 3


def test_bad_annotations_and_degenerate_boxes_have_clear_errors(tmp_path):
    ann_path = _written_set(tmp_path)
    coco = json.loads(ann_path.read_text())
    coco["annotations"][0]["image_id"] = 77
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(ConfigError, match="references image_id 77, which is not in 'images'"):
        CocoDetectionData(tmp_path / "images", bad)
    (tmp_path / "images" / "000002.png").unlink()
    with pytest.raises(ConfigError, match=r"1 listed image\(s\) missing.*000002.png"):
        CocoDetectionData(tmp_path / "images", ann_path)
    target = {"boxes": torch.tensor([[5.0, 5.0, 20.0, 30.0], [8.0, 9.0, 8.0, 20.0]]), "labels": torch.tensor([1, 2]),
              "image_id": torch.tensor(12)}
    with pytest.raises(ValueError, match=r"image 12: box 1 \[8.0, 9.0, 8.0, 20.0\] is degenerate"):
        check_targets([target])
    target["boxes"] = target["boxes"][:1]
    target["labels"] = torch.tensor([5])
    with pytest.raises(ValueError, match="label 5 is outside.*num_classes=4"):
        check_targets([target], num_classes=4)


def test_class_count_mismatch_of_a_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file(det("fasterrcnn_resnet18_fpn").state_dict(), str(tmp_path / "t.safetensors"))
    model = build_detector("fasterrcnn_resnet18_fpn", 7, **SMALL)
    with pytest.raises(ConfigError, match="trained for 4 classes.*num_classes=7"):
        load_detector_weights(model, tmp_path / "t.safetensors", num_classes=7)


def _gt_as_predictions(targets):
    return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.full((len(t["boxes"]),), 0.9),
             "masks": t["masks"][:, None].float()} for t in targets]


def test_ground_truth_as_predictions_scores_ap_one_with_cocoeval_and_torchmetrics():
    from kdistill.detection.evaluate import predictions_to_coco

    ds = SyntheticShapesCOCO(6, image_size=((96, 140), (100, 160)), seed=1, mask_format="rle")
    targets = [ds[i][1] for i in range(len(ds))]
    gt = ds.to_coco_dict()
    preds = _gt_as_predictions(targets)
    metrics = coco_evaluate(gt, predictions_to_coco(preds, [int(t["image_id"]) for t in targets]), ("bbox", "segm"))
    for iou in ("bbox", "segm"):
        assert metrics[f"{iou}_AP"] == metrics[f"{iou}_AP50"] == metrics[f"{iou}_AP75"] == 1.0
    assert coco_evaluate(targets_to_coco(targets, ds.categories), predictions_to_coco(
        preds, [int(t["image_id"]) for t in targets]), ("bbox",))["bbox_AP"] == 1.0
    tm = pytest.importorskip("torchmetrics.detection")
    metric = tm.MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools")
    metric.update([{**p, "masks": p["masks"][:, 0] > 0.5} for p in preds],
                  [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"].bool()} for t in targets])
    out = metric.compute()
    assert out["bbox_map"].item() == pytest.approx(1.0) and out["segm_map"].item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def coco128() -> Path:
    archive = SHARED / "data" / "coco128-seg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real COCO data not available: {archive} is missing")
    from kdistill.detection.data import unpack_cached

    return unpack_cached(archive) / "coco128-seg"


def test_coco128_reads_real_polygons_and_evaluates(coco128):
    data = CocoDetectionData(coco128 / "val2017", coco128 / "annotations" / "instances_val2017.json")
    assert len(data) == 100 and data.num_classes == 91
    coco = data.coco
    assert len(coco["annotations"]) == 712
    image, target = data[0]
    info = data.images[0]
    assert tuple(image.shape) == (3, info["height"], info["width"])
    assert target["masks"].shape == (len(target["boxes"]), info["height"], info["width"])
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        # polygon rasterisation stays within a pixel of the polygon's stored extent
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
    targets = [data[i][1] for i in range(10)]
    from kdistill.detection.evaluate import predictions_to_coco

    gt = {**coco, "images": data.images[:10],
          "annotations": [a for a in coco["annotations"] if a["image_id"] in {i["id"] for i in data.images[:10]}]}
    metrics = coco_evaluate(gt, predictions_to_coco(_gt_as_predictions(targets), [int(t["image_id"]) for t in targets]),
                            ("bbox",))
    assert metrics["bbox_AP"] == pytest.approx(1.0)


def test_bf16_autocast_step_keeps_the_review_loss_in_float32():
    d = ReviewKDDetection(det("fasterrcnn_resnet18_fpn", min_size=96, max_size=96),
                          det("fasterrcnn_resnet18_fpn", min_size=96, max_size=96), probe_size=(96, 96)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = d(*batch(size=(96, 96)))
    assert losses["loss_reviewkd"].dtype == torch.float32
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in d.abfs.parameters() if p.grad is not None)


def test_training_shards_are_disjoint_per_rank_and_change_per_epoch():
    from kdistill.detection.engine import ShardSampler

    shards = [ShardSampler(10, True, seed=3, rank=r, world=3) for r in range(3)]
    first = [list(s) for s in shards]
    assert [len(s) for s in first] == [4, 4, 4]
    flat = [i for s in first for i in s]
    assert set(flat) == set(range(10)) and len(flat) == 12  # every index once, two repeated as padding
    for s in shards:
        s.set_epoch(1)
    assert [list(s) for s in shards] != first
    assert list(ShardSampler(5, False, seed=0, rank=1, world=2)) == [1, 3]


def _noisy_predictions(targets, seed=0):
    """Ground truth moved by a few pixels, some instances missed, random scores, one false positive per image."""
    g = torch.Generator().manual_seed(seed)
    preds = []
    for t in targets:
        keep = torch.rand(len(t["boxes"]), generator=g) > 0.2
        shift = torch.randint(-3, 4, (int(keep.sum()), 2), generator=g)
        boxes = t["boxes"][keep] + shift.repeat(1, 2).float()
        masks = torch.stack([torch.roll(m, (int(s[1]), int(s[0])), (0, 1)) for m, s in zip(t["masks"][keep], shift,
                                                                                             strict=True)]) \
            if keep.any() else t["masks"][:0]
        h, w = t["masks"].shape[-2:]
        fp = torch.zeros(1, h, w, dtype=torch.uint8)
        fp[0, 2:30, 3:25] = 1
        preds.append({"boxes": torch.cat([boxes, torch.tensor([[3.0, 2.0, 25.0, 30.0]])]),
                      "labels": torch.cat([t["labels"][keep], t["labels"][:1]]),
                      "scores": torch.rand(int(keep.sum()) + 1, generator=g),
                      "masks": torch.cat([masks, fp])[:, None].float()})
    return preds


def test_faster_coco_eval_gives_the_numbers_of_pycocotools():
    pytest.importorskip("faster_coco_eval", reason="faster-coco-eval is not installed (pip install faster-coco-eval; "
                        "it is in the dev extra): nothing to compare pycocotools with")
    from kdistill.detection.evaluate import predictions_to_coco

    ds = SyntheticShapesCOCO(8, image_size=((96, 140), (100, 160)), seed=4, max_objects=5)
    targets = [ds[i][1] for i in range(len(ds))]
    results = predictions_to_coco(_noisy_predictions(targets), [int(t["image_id"]) for t in targets])
    reference = coco_evaluate(ds.to_coco_dict(), results, ("bbox", "segm"), backend="pycocotools")
    faster = coco_evaluate(ds.to_coco_dict(), results, ("bbox", "segm"), backend="faster_coco_eval")
    assert sorted(faster) == sorted(reference) and len(reference) == 12
    for key, value in reference.items():
        assert faster[key] == pytest.approx(value, abs=1e-12), key
    # a case that separates scorers: neither perfect nor empty
    assert 0.2 < reference["bbox_AP"] < 0.95 and 0.2 < reference["segm_AP"] < 0.95


def test_coco_backend_auto_prefers_faster_coco_eval_and_falls_back(monkeypatch):
    from kdistill.detection.evaluate import coco_backend

    with pytest.raises(ConfigError, match=r"backend must be one of \('auto', 'pycocotools', 'faster_coco_eval'\), "
                                          r"got 'cocoapi'"):
        coco_backend("cocoapi")
    try:
        import faster_coco_eval  # noqa: F401

        assert coco_backend("auto")[0] == "faster_coco_eval"
    except ImportError:
        assert coco_backend("auto")[0] == "pycocotools"
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # the import now fails as if not installed
    assert coco_backend("auto")[0] == "pycocotools"
    with pytest.raises(ConfigError, match="needs the faster-coco-eval package"):
        coco_backend("faster_coco_eval")
