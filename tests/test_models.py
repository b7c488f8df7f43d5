"""The model zoo: the CIFAR-100 benchmark families (RepDistiller, mdistiller), ImageNet MobileNetV1 (ReviewKD).

Checks per model: state-dict key→shape map equal to the shared-checkpoint layout
(``tests/data/cifar_state_dict_keys.json``), parameter counts equal the published table, logits shape. Per family:
the stage preset taps (post- and pre-ReLU) equal reference features computed here independently
from the reference definitions by running sub-modules by hand, with the reference shapes; a wrong module
name is reported with the available names; WRN pre-ReLU taps do not touch BN statistics; a checkpoint in the shared CIFAR format loads.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import kdistill
from kdistill.features import FeatureRecorder, stage_taps
from kdistill.utils import ConfigError

# every state-dict key and shape of the reference CIFAR-100 models (100 classes), as the shared
# <name>_vanilla/ckpt_epoch_240.pth teacher checkpoints hold them
KEYS_JSON = Path(__file__).resolve().parent / "data" / "cifar_state_dict_keys.json"

# reference constructor name (JSON key) -> kdistill registry name
REGISTRY_NAME = {"MobileNetV2": "cifar.mobile_half", "ShuffleV1": "cifar.shufflev1", "ShuffleV2": "cifar.shufflev2",
                 "ResNet50": "cifar.resnet50"}

# trainable parameters at 100 classes, as published with the reference definitions
TABLE_PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "MobileNetV2": 812_836, "ShuffleV1": 949_258, "ShuffleV2": 1_355_528, "ResNet50": 23_705_252,
}  # fmt: skip


def _layouts() -> dict:
    return json.loads(KEYS_JSON.read_text())["models"]


def _build(name: str, seed: int = 0, num_classes: int = 100) -> nn.Module:
    torch.manual_seed(seed)
    return kdistill.create_model(name, num_classes=num_classes)


def _randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics, so eval-mode BN is not ≈ identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


# --- per model: layout, parameter count, logits -------------------------------------------------


@pytest.mark.parametrize("ref_name", list(TABLE_PARAMS))
def test_cifar_layout_params_and_logits(ref_name: str) -> None:
    layout = _layouts()[ref_name]
    model = _build(REGISTRY_NAME.get(ref_name, f"cifar.{ref_name}"))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = layout["state_dict"]
    assert sorted(set(want) - set(got)) == [], "keys missing from the model"
    assert sorted(set(got) - set(want)) == [], "keys the shared checkpoints do not have"
    assert {k: s for k, s in got.items() if s != want[k]} == {}, "shape mismatches"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == TABLE_PARAMS[ref_name] == layout["parameters"]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_mobilenet_v1_layout_and_params() -> None:
    model = _build("imagenet.mobilenet_v1", num_classes=1000)
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    # stem conv + BN, then per block: depthwise 3×3 + BN(cin) + pointwise + BN(cout); fc
    expected = 3 * 32 * 9 + 2 * 32
    expected += sum(cin * 9 + 2 * cin + cin * cout + 2 * cout for cin, cout in zip(widths[:-1], widths[1:], strict=True))
    expected += 1024 * 1000 + 1000
    assert sum(p.numel() for p in model.parameters()) == expected == 4_231_976
    sd = model.state_dict()
    assert list(sd)[:2] == ["model.0.0.weight", "model.0.1.weight"]
    assert sd["model.1.0.weight"].shape == (32, 1, 3, 3)
    assert sd["model.1.3.weight"].shape == (64, 32, 1, 1)
    assert sd["model.13.4.running_var"].shape == (1024,)
    assert sd["fc.weight"].shape == (1000, 1024)
    assert not any(k.startswith("model.14") for k in sd)
    assert len(sd) == 6 + 13 * 12 + 2  # stem conv + BN (5 entries); per block 2 convs + 2 BNs; fc


# --- reference features, written from the reference definitions ----------------------------------


def _shuffle(x: Tensor, groups: int) -> Tensor:
    per = x.shape[1] // groups
    order = [g * per + k for k in range(per) for g in range(groups)]
    return x[:, order]


def _ref_cifar_resnet(m: nn.Module, x: Tensor, n_stages: int, last_bn: str, shortcut: str):
    """ResNet / ResNet50: post = stage outputs; pre = last block's residual sum before its ReLU."""
    out = F.relu(m.bn1(m.conv1(x)))
    post, pre = [out], [out]
    for s in range(1, n_stages + 1):
        for blk in m.get_submodule(f"layer{s}"):
            h = F.relu(blk.bn1(blk.conv1(out)))
            h = blk.bn2(blk.conv2(h))
            if last_bn == "bn3":
                h = blk.bn3(blk.conv3(F.relu(h)))
            proj = getattr(blk, shortcut)
            residual = h + (out if proj is None or len(proj) == 0 else proj[1](proj[0](out)))
            out = F.relu(residual)
        post.append(out)
        pre.append(residual)
    return post, pre, out.mean((2, 3))


def _ref_wrn(m: nn.Module, x: Tensor):
    """WRN: post = raw group sums; pre = the next BN applied (eval mode: no side effects)."""
    out = m.conv1(x)
    post = [out]
    for group in (m.block1, m.block2, m.block3):
        for blk in group.layer:
            a = F.relu(blk.bn1(out))
            h = blk.conv2(F.relu(blk.bn2(blk.conv1(a))))
            out = h + (out if blk.convShortcut is None else blk.convShortcut(a))
        post.append(out)
    pre = [post[0], m.block2.layer[0].bn1(post[1]), m.block3.layer[0].bn1(post[2]), m.bn1(post[3])]
    return post, pre, F.relu(m.bn1(post[3])).mean((2, 3))


def _ref_vgg(m: nn.Module, x: Tensor):
    """VGG: conv-BN(-ReLU) chains by hand; block outputs are the last BN, ReLU applied outside."""

    def block(seq: nn.Sequential, h: Tensor) -> Tensor:
        convs = [mod for mod in seq if isinstance(mod, nn.Conv2d)]
        bns = [mod for mod in seq if isinstance(mod, nn.BatchNorm2d)]
        for i, (conv, bn) in enumerate(zip(convs, bns, strict=True)):
            h = bn(conv(h))
            if i < len(convs) - 1:
                h = F.relu(h)
        return h

    h = F.relu(block(m.block0, x))
    post, pre = [h], [h]
    for i in range(1, 5):
        if i <= 3:
            h = F.max_pool2d(h, 2)
        b = block(m.get_submodule(f"block{i}"), h)
        h = F.relu(b)
        pre.append(b)
        post.append(h)
    return post, pre, h.mean((2, 3))


def _ref_mobilenetv2(m: nn.Module, x: Tensor):
    """MobileNetV2: linear group outputs after groups 1, 2, 4, 6 (pre = post)."""
    out = m.conv1(x)
    feats = [out]
    for g, group in enumerate(m.blocks):
        for blk in group:
            c = blk.conv
            h = c[7](c[6](F.relu(c[4](c[3](F.relu(c[1](c[0](out))))))))
            out = out + h if h.shape == out.shape else h
        if g in (1, 2, 4, 6):
            feats.append(out)
    return feats, feats, m.conv2(out).mean((2, 3))


def _ref_shufflev1(m: nn.Module, x: Tensor):
    """ShuffleNetV1: group conv, shuffle, depthwise, group conv; add identity or concat avg-pooled input."""
    out = F.relu(m.bn1(m.conv1(x)))
    post, pre = [out], [out]
    for s in (1, 2, 3):
        for blk in m.get_submodule(f"layer{s}"):
            groups1 = 1 if blk.conv1.in_channels == 24 else 3
            h = _shuffle(F.relu(blk.bn1(blk.conv1(out))), groups1)
            h = blk.bn3(blk.conv3(F.relu(blk.bn2(blk.conv2(h)))))
            if blk.conv2.stride == (2, 2):
                residual = torch.cat([h, F.avg_pool2d(out, 3, 2, 1)], 1)
            else:
                residual = h + out
            out = F.relu(residual)
        post.append(out)
        pre.append(residual)
    return post, pre, out.mean((2, 3))


def _ref_shufflev2(m: nn.Module, x: Tensor):
    """ShuffleNetV2: pre-ReLU stage feature = concat[x1, last bn3 output], not shuffled."""
    out = F.relu(m.bn1(m.conv1(x)))
    post, pre = [out], [out]
    for s in (1, 2, 3):
        down, *basics = m.get_submodule(f"layer{s}")
        left = F.relu(down.bn2(down.conv2(down.bn1(down.conv1(out)))))
        right = F.relu(down.bn3(down.conv3(out)))
        right = F.relu(down.bn5(down.conv5(down.bn4(down.conv4(right)))))
        out = _shuffle(torch.cat([left, right], 1), 2)
        for blk in basics:
            half = out.shape[1] // 2
            x1, x2 = out[:, :half], out[:, half:]
            h = blk.bn3(blk.conv3(blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x2)))))))
            concat_pre = torch.cat([x1, h], 1)
            out = _shuffle(torch.cat([x1, F.relu(h)], 1), 2)
        post.append(out)
        pre.append(concat_pre)
    return post, pre, F.relu(m.bn2(m.conv2(out))).mean((2, 3))


def _ref_mobilenet_v1(m: nn.Module, x: Tensor):
    """MobileNetV1 as ReviewKD uses it: blocks 3, 5, 11, 13 before their final ReLU (pre) or after it (post)."""
    out = m.model[0](x)
    post, pre = [out], [out]
    for i in range(1, 14):
        blk = m.model[i]
        before_relu = blk[4](blk[3](F.relu(blk[1](blk[0](out)))))
        out = F.relu(before_relu)
        if i in (3, 5, 11, 13):
            pre.append(before_relu)
            post.append(out)
    return post, pre, out.mean((2, 3))


# name, reference function, input side, expected (channels, spatial) for stem, stages, pooled
FAMILIES = {
    "cifar.resnet8": (lambda m, x: _ref_cifar_resnet(m, x, 3, "bn2", "downsample"), 32,
                      [(16, 32), (16, 32), (32, 16), (64, 8)], 64),
    "cifar.resnet8x4": (lambda m, x: _ref_cifar_resnet(m, x, 3, "bn2", "downsample"), 32,
                        [(32, 32), (64, 32), (128, 16), (256, 8)], 256),
    "cifar.resnet50": (lambda m, x: _ref_cifar_resnet(m, x, 4, "bn3", "shortcut"), 32,
                       [(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)], 2048),
    "cifar.wrn_16_1": (_ref_wrn, 32, [(16, 32), (16, 32), (32, 16), (64, 8)], 64),
    "cifar.wrn_16_2": (_ref_wrn, 32, [(16, 32), (32, 32), (64, 16), (128, 8)], 128),
    "cifar.vgg8": (_ref_vgg, 32, [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)], 512),
    "cifar.vgg13": (_ref_vgg, 32, [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)], 512),
    "cifar.mobile_half": (_ref_mobilenetv2, 32, [(16, 16), (12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "cifar.shufflev1": (_ref_shufflev1, 32, [(24, 32), (240, 16), (480, 8), (960, 4)], 960),
    "cifar.shufflev2": (_ref_shufflev2, 32, [(24, 32), (116, 16), (232, 8), (464, 4)], 1024),
    "imagenet.mobilenet_v1": (_ref_mobilenet_v1, 64, [(32, 32), (128, 16), (256, 8), (512, 4), (1024, 2)], 1024),
}  # fmt: skip

# families whose pre-ReLU stage features differ from the post-ReLU ones
PRE_DIFFERS = set(FAMILIES) - {"cifar.mobile_half"}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stage_preset_matches_reference(name: str) -> None:
    reference, side, shapes, pooled_width = FAMILIES[name]
    model = _randomise_bn(_build(name, num_classes=10)).eval()
    post_taps, pre_taps = stage_taps(model, preact=False), stage_taps(model, preact=True)
    keys = ["stem", *[f"stage{i}" for i in range(1, len(shapes))], "pooled"]
    assert list(post_taps) == keys and list(pre_taps) == keys
    taps = {**{f"post.{k}": v for k, v in post_taps.items()}, **{f"pre.{k}": v for k, v in pre_taps.items()}}
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with FeatureRecorder(model, taps, detach=True) as rec:
            logits = model(x)
        got = rec.features
        ref_post, ref_pre, ref_pooled = reference(model, x)
        assert torch.allclose(model.get_submodule(_classifier(model))(ref_pooled), logits, atol=1e-4)
    for key, want_post, want_pre, (channels, spatial) in zip(keys[:-1], ref_post, ref_pre, shapes, strict=True):
        assert got[f"post.{key}"].shape == (2, channels, spatial, spatial), key
        torch.testing.assert_close(got[f"post.{key}"], want_post, atol=1e-5, rtol=1e-4, msg=f"post {key}")
        torch.testing.assert_close(got[f"pre.{key}"], want_pre, atol=1e-5, rtol=1e-4, msg=f"pre {key}")
    for variant in ("post", "pre"):
        pooled = got[f"{variant}.pooled"]
        assert pooled.shape[:2] == (2, pooled_width)
        torch.testing.assert_close(pooled.flatten(1), ref_pooled, atol=1e-5, rtol=1e-4)
    for key in keys[1:-1]:
        differs = not torch.allclose(got[f"post.{key}"], got[f"pre.{key}"])
        assert differs == (name in PRE_DIFFERS), f"{name} {key}: pre/post differ={differs}"
        if name in PRE_DIFFERS and not name.startswith("cifar.wrn"):
            assert got[f"pre.{key}"].min() < 0 <= got[f"post.{key}"].min()


def _classifier(model: nn.Module) -> str:
    return next(n for n in ("fc", "linear", "classifier") if hasattr(model, n))


def test_shufflev2_pre_relu_is_unshuffled_concat() -> None:
    # as in the reference, the pre-ReLU feature keeps the un-shuffled channel order, so after a ReLU it is a
    # channel permutation of the post-ReLU stage output, not equal to it
    model = _build("cifar.shufflev2").eval()
    taps = {"post": "layer1", "pre": stage_taps(model, preact=True)["stage1"]}
    with torch.no_grad(), FeatureRecorder(model, taps) as rec:
        model(torch.randn(2, 3, 32, 32))
    post, pre = rec.features["post"], rec.features["pre"]
    torch.testing.assert_close(_shuffle(F.relu(pre), 2), post)
    assert not torch.allclose(F.relu(pre), post)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bad", "real"),
    [
        ("cifar.wrn_16_1", "block2.layer.0.bn9", "block2.layer.0.bn1"),
        ("cifar.vgg8", "block7", "block4"),
        ("cifar.mobile_half", "blocks.9", "blocks.6"),
        ("cifar.shufflev1", "layer4", "layer3"),
        ("cifar.shufflev2", "layer1.3.preakt", "layer1.3.preact"),
        ("cifar.resnet50", "layer5", "layer4"),
        ("imagenet.mobilenet_v1", "model.99", "model.13"),
    ],
)
def test_wrong_tap_name_lists_available(name: str, bad: str, real: str) -> None:
    model = _build(name, num_classes=10)
    with pytest.raises(ConfigError) as info:
        FeatureRecorder(model, {"stage1": bad})
    message = str(info.value)
    assert repr(bad) in message and real in message and "Allowed" in message


# --- WRN pre-ReLU taps have no side effects ---------------------------------------------------------


def test_wrn_pre_relu_taps_leave_bn_statistics_alone() -> None:
    plain = _build("cifar.wrn_16_2").train()
    tapped = copy.deepcopy(plain)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    taps = {**stage_taps(tapped, preact=True), **{f"raw{i}": f"block{i}" for i in (1, 2, 3)}}
    with torch.no_grad():
        plain(x)
        with FeatureRecorder(tapped, taps, detach=True) as rec:
            tapped(x)
    for (key, a), b in zip(plain.state_dict().items(), tapped.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{key} changed by tapping"
    feats = rec.features
    # train-mode reference value (batch statistics), computed without touching any running buffer
    for stage, raw, bn in (("stage1", "raw1", tapped.block2.layer[0].bn1), ("stage2", "raw2", tapped.block3.layer[0].bn1),
                           ("stage3", "raw3", tapped.bn1)):  # fmt: skip
        want = F.batch_norm(feats[raw], None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
        torch.testing.assert_close(feats[stage], want, atol=1e-5, rtol=1e-4)
    # the reference's way (calling the live BN again) would have moved the running mean
    before = tapped.bn1.running_mean.clone()
    with torch.no_grad():
        tapped.bn1(feats["raw3"])
    assert not torch.equal(before, tapped.bn1.running_mean)


# --- the lead's CIFAR ResNet preset, explicitly ----------------------------------------------------


@pytest.mark.parametrize("name", ["cifar.resnet8", "cifar.resnet8x4", "cifar.resnet20"])
def test_cifar_resnet_pre_relu_spec_is_bn2_plus_shortcut(name: str) -> None:
    model = _build(name)
    pre = stage_taps(model, preact=True)
    for s in (1, 2, 3):
        layer = model.get_submodule(f"layer{s}")
        last = f"layer{s}.{len(layer) - 1}"
        skip = f"{last}.downsample" if layer[-1].downsample is not None else f"{last}:input"
        assert pre[f"stage{s}"] == f"{last}.bn2+{skip}"
    assert stage_taps(model)["stage1"] == "layer1"


# --- checkpoints in the shared CIFAR format --------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["cifar.resnet8", "cifar.wrn_16_1", "cifar.vgg8", "cifar.mobile_half", "cifar.shufflev1", "cifar.shufflev2",
     "cifar.resnet50", "imagenet.mobilenet_v1"],
)  # fmt: skip
def test_shared_checkpoint_format_loads(name: str, tmp_path: Path) -> None:
    source = _randomise_bn(_build(name, seed=0, num_classes=100)).eval()
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": source.state_dict(), "epoch": 240, "accuracy": 70.0}, path)
    target = _build(name, seed=1, num_classes=100).eval()
    kdistill.load_weights(target, path)
    side = 64 if name.startswith("imagenet.") else 32
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), atol=0, rtol=0)


def test_old_checkpoint_without_num_batches_tracked_loads(tmp_path: Path) -> None:
    source = _build("cifar.wrn_16_1", seed=0)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": state, "epoch": 240, "accuracy": torch.tensor(75.61)}, path)
    target = kdistill.load_weights(_build("cifar.wrn_16_1", seed=1), path)
    assert torch.equal(target.conv1.weight, source.conv1.weight)


def test_torchvision_mobilenet_v2_preset() -> None:
    model = _randomise_bn(_build("torchvision.mobilenet_v2", num_classes=10)).eval()
    post, pre = stage_taps(model), stage_taps(model, preact=True)
    assert post == pre
    assert [post[f"stage{i}"] for i in (1, 2, 3, 4)] == ["features.3", "features.6", "features.13", "features.17"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        with FeatureRecorder(model, post) as rec:
            logits = model(x)
        h, want = x, {}
        for i, layer in enumerate(model.features):
            h = layer(h)
            want[i] = h
        got = rec.features
        torch.testing.assert_close(model.classifier(got["pooled"].flatten(1)), logits)
    for key, index, (channels, side) in zip(
        ["stem", "stage1", "stage2", "stage3", "stage4"], [0, 3, 6, 13, 17],
        [(32, 32), (24, 16), (32, 8), (96, 4), (320, 2)], strict=True,
    ):  # fmt: skip
        assert got[key].shape == (2, channels, side, side)
        torch.testing.assert_close(got[key], want[index])
    torch.testing.assert_close(got["pooled"], want[18].mean((2, 3), keepdim=True))
