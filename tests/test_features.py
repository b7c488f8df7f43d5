"""Feature taps against a manual forward, on a small hand-built model and a CIFAR ResNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdistill
from kdistill.features import FeatureRecorder, TapSpec, probe_shapes, stage_taps


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)  # an in-place op after a tapped module
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


def test_taps_equal_manual_forward_despite_inplace_relu() -> None:
    m = Tiny().eval()
    x = torch.randn(2, 3, 5, 5)
    taps = {"pre": "bn", "post": "act", "inp": "act:input", "sum": "conv+bn", "relu": "bn!relu", "pool": "act!mean"}
    with FeatureRecorder(m, taps) as rec:
        m(x)
    f = rec.features
    conv = m.conv(x)
    pre = m.bn(conv)
    torch.testing.assert_close(f["pre"], pre)  # would equal relu(pre) without the clone
    assert (f["pre"] < 0).any()
    torch.testing.assert_close(f["post"], pre.clamp_min(0))
    torch.testing.assert_close(f["inp"], pre)
    torch.testing.assert_close(f["sum"], conv + pre)
    torch.testing.assert_close(f["relu"], pre.clamp_min(0))
    torch.testing.assert_close(f["pool"], pre.clamp_min(0).mean((2, 3), keepdim=True))


def test_student_taps_keep_the_graph_teacher_taps_detach() -> None:
    m = Tiny()
    x = torch.randn(2, 3, 5, 5)
    with FeatureRecorder(m, {"f": "bn"}) as rec:
        m(x)
    rec.features["f"].sum().backward()
    assert m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0
    with FeatureRecorder(m, {"f": "bn"}, detach=True) as rec:
        m(x)
    assert not rec.features["f"].requires_grad


def test_hooks_removed_after_context() -> None:
    m = Tiny()
    with FeatureRecorder(m, {"f": "bn"}):
        assert len(m.bn._forward_hooks) == 1
    assert len(m.bn._forward_hooks) == 0


def test_wrong_module_name_lists_available() -> None:
    with pytest.raises(ValueError, match=r"unknown module for tap 'x' 'bnn'.*Did you mean 'bn'.*Allowed: act, bn, conv, head"):
        FeatureRecorder(Tiny(), {"x": "bnn"})
    with pytest.raises(ValueError, match="unknown tap operation 'max'"):
        TapSpec.parse("bn!max")
    with pytest.raises(ValueError, match="after ':' use 'input' or 'output'"):
        TapSpec.parse("bn:inputs")


def test_cifar_resnet_preset_against_manual_forward() -> None:
    m = kdistill.create_model("cifar.resnet8", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    post, pre = stage_taps(m), stage_taps(m, preact=True)
    assert list(post) == ["stem", "stage1", "stage2", "stage3", "pooled"]
    with FeatureRecorder(m, {**post, **{f"pre_{k}": v for k, v in pre.items()}}) as rec:
        m(x)
    f = rec.features
    with torch.no_grad():
        stem = torch.relu(m.bn1(m.conv1(x)))
        h1 = m.layer1(stem)
        b = m.layer2[0]
        body = b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(h1)))))
        pre2 = body + b.downsample(h1)
    torch.testing.assert_close(f["stem"], stem)
    torch.testing.assert_close(f["stage1"], h1)
    torch.testing.assert_close(f["pre_stage2"], pre2)
    torch.testing.assert_close(f["stage2"], torch.relu(pre2))
    torch.testing.assert_close(f["pooled"], f["stage3"].mean((2, 3), keepdim=True))
    shapes = probe_shapes(m, post, (3, 32, 32))
    assert shapes["stage3"] == (64, 8, 8) and shapes["pooled"] == (64, 1, 1)


def test_torchvision_resnet_preset_bottleneck_preact() -> None:
    m = kdistill.create_model("torchvision.resnet50", num_classes=10).eval()
    pre = stage_taps(m, preact=True)
    assert pre["stage1"] == "layer1.2.bn3+layer1.2:input"
    assert pre["stage4"] == "layer4.2.bn3+layer4.2:input"
    x = torch.randn(1, 3, 64, 64)
    with FeatureRecorder(m, {"pre": pre["stage4"], "post": "layer4"}) as rec:
        m(x)
    torch.testing.assert_close(rec.features["post"], torch.relu(rec.features["pre"]))


def test_probe_leaves_batchnorm_statistics_untouched() -> None:
    m = kdistill.create_model("cifar.resnet8", num_classes=10).train()
    before = m.bn1.running_mean.clone()
    probe_shapes(m, stage_taps(m), (3, 32, 32))
    torch.testing.assert_close(m.bn1.running_mean, before)
    assert m.training


def test_unknown_model_has_no_preset() -> None:
    with pytest.raises(ValueError, match="no stage preset .*give the taps by module name"):
        stage_taps(Tiny())
