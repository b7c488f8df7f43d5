"""ReviewKD: HCL values by hand, ABF behaviour, the review chain per published pair, training step.

Numbers are the authors' code's (ABF and HCL definitions, per-pair channels and parameter counts of
the published CIFAR-100 and ImageNet pairs); docs/methods/reviewkd.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill
from kdistill.features import stage_taps
from kdistill.losses import hcl_loss
from kdistill.methods.base import Batch, ModelOutput, StepInfo
from kdistill.methods.reviewkd import ABF, ReviewKD
from kdistill.models import list_models
from kdistill.recipes import load_recipe
from kdistill.step import Distiller
from kdistill.utils import ConfigError

# --- HCL -----------------------------------------------------------------------------------------


def _window_pool(x: torch.Tensor, level: int) -> torch.Tensor:
    """Adaptive average pooling written out: window i spans [floor(i·h/l), ceil((i+1)·h/l))."""
    h, w = x.shape[-2:]
    rows = []
    for i in range(level):
        r0, r1 = (i * h) // level, -((-(i + 1) * h) // level)
        cols = []
        for j in range(level):
            c0, c1 = (j * w) // level, -((-(j + 1) * w) // level)
            cols.append(x[..., r0:r1, c0:c1].mean(dim=(-2, -1)))
        rows.append(torch.stack(cols, -1))
    return torch.stack(rows, -2)


def _reference_hcl(students, teachers, levels=(4, 2, 1), decay=0.5, limit=lambda h, w: h):
    """Independent HCL: the weights of the used levels are decay^1, decay^2, ...."""
    total = 0.0
    for s, t in zip(students, teachers, strict=True):
        used = [lv for lv in levels if lv < limit(*s.shape[-2:])]
        weights = [decay ** (k + 1) for k in range(len(used))]
        terms = [((s - t) ** 2).mean()] + [
            wk * ((_window_pool(s, lv) - _window_pool(t, lv)) ** 2).mean() for wk, lv in zip(weights, used, strict=True)
        ]
        total = total + sum(terms) / (1 + sum(weights))
    return total


@pytest.mark.parametrize("h", [1, 2, 3, 4, 5, 8, 32])
@pytest.mark.parametrize(("a", "b", "expected"), [(1.0, 0.0, 1.0), (3.0, -1.0, 16.0)])
def test_hcl_constant_maps(h, a, b, expected):
    s, t = torch.full((2, 3, h, h), a), torch.full((2, 3, h, h), b)
    assert hcl_loss([s], [t]).item() == pytest.approx(expected, abs=1e-6)


def test_hcl_sums_stages():
    s1, s2 = torch.ones(1, 2, 8, 8), torch.ones(1, 4, 4, 4)
    assert hcl_loss([s1, s2], [torch.zeros_like(s1), torch.zeros_like(s2)]).item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize(("h", "expected"), [(2, 2 / 3), (4, 4 / 7), (8, 8 / 15), (32, 8 / 15)])
def test_hcl_checkerboard(h, expected):
    i, j = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
    s = ((-1.0) ** (i + j)).expand(2, 3, h, h)
    assert hcl_loss([s], [torch.zeros_like(s)]).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("h", "expected"), [(8, 39 / 4096), (4, 73 / 1792), (2, 3 / 16)])
def test_hcl_single_hot_pixel(h, expected):
    s = torch.zeros(1, 1, h, h)
    s[0, 0, 1, 0] = 1.0
    assert hcl_loss([s], [torch.zeros_like(s)]).item() == pytest.approx(expected, abs=1e-6)


def test_hcl_1x1_is_mse_and_height_decides_skipping():
    torch.manual_seed(0)
    s, t = torch.randn(4, 5, 1, 1), torch.randn(4, 5, 1, 1)
    assert hcl_loss([s], [t]).item() == pytest.approx(F.mse_loss(s, t).item(), abs=1e-6)
    # 3×5: h = 3 → levels 2 and 1 are used (τ = 1.75) although w = 5 would also allow 4×4
    s, t = torch.randn(2, 3, 3, 5), torch.randn(2, 3, 3, 5)
    manual = (
        F.mse_loss(s, t)
        + 0.5 * F.mse_loss(_window_pool(s, 2), _window_pool(t, 2))
        + 0.25 * F.mse_loss(_window_pool(s, 1), _window_pool(t, 1))
    ) / 1.75
    assert hcl_loss([s], [t]).item() == pytest.approx(manual.item(), abs=1e-6)
    # the optional min(h, w) rule on an 8×2 map only keeps the 1×1 level
    s, t = torch.randn(2, 3, 8, 2), torch.randn(2, 3, 8, 2)
    manual = (F.mse_loss(s, t) + 0.5 * F.mse_loss(s.mean((2, 3)), t.mean((2, 3)))) / 1.5
    assert hcl_loss([s], [t], skip_rule="min_hw").item() == pytest.approx(manual.item(), abs=1e-6)


def test_hcl_matches_independent_reimplementation():
    torch.manual_seed(1)
    sizes = [(16, 32, 32), (32, 16, 16), (64, 7, 7), (64, 3, 3), (64, 1, 1)]
    students = [torch.randn(2, *c) for c in sizes]
    teachers = [torch.randn(2, *c) for c in sizes]
    ours = hcl_loss(students, teachers)
    assert ours.item() == pytest.approx(float(_reference_hcl(students, teachers)), rel=1e-5)
    custom = hcl_loss(students, teachers, levels=(8, 3), level_weight_decay=0.3)
    assert custom.item() == pytest.approx(float(_reference_hcl(students, teachers, (8, 3), 0.3)), rel=1e-5)
    plain = sum(F.mse_loss(s, t) for s, t in zip(students, teachers, strict=True))
    assert hcl_loss(students, teachers, levels=()).item() == pytest.approx(plain.item(), rel=1e-6)


def test_hcl_gradient_only_to_student_and_errors():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    hcl_loss([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match=r"stage 1: student \(2, 3, 4, 4\) and teacher \(2, 3, 2, 2\)"):
        hcl_loss([s, s], [t, torch.zeros(2, 3, 2, 2)])
    with pytest.raises(ValueError, match="2 student features but 1 teacher"):
        hcl_loss([s, s], [t])


# --- ABF -----------------------------------------------------------------------------------------


def _abf_params(c_in: int, c_m: int, c_out: int, fuse: bool) -> int:
    return c_in * c_m + 2 * c_m + 9 * c_m * c_out + 2 * c_out + (4 * c_m + 2 if fuse else 0)


def test_abf_structure_parameter_count_and_init():
    torch.manual_seed(0)
    abf = ABF(16, 64, 16, fuse=True)
    assert sum(p.numel() for p in abf.parameters()) == 10_658 == _abf_params(16, 64, 16, True)
    names = {n for n, _ in abf.named_parameters()}
    assert names == {
        "conv1.0.weight", "conv1.1.weight", "conv1.1.bias",
        "conv2.0.weight", "conv2.1.weight", "conv2.1.bias",
        "att_conv.0.weight", "att_conv.0.bias",
    }  # fmt: skip
    deep = ABF(64, 64, 64, fuse=False)
    assert deep.att_conv is None and sum(p.numel() for p in deep.parameters()) == 41_216
    for conv, fan_in in ((abf.conv1[0], 16), (abf.conv2[0], 9 * 64)):
        bound = math.sqrt(3 / fan_in)
        assert conv.bias is None
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    for bn in (abf.conv1[1], abf.conv2[1]):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_abf_counts_of_the_detection_chain():
    # the detection setting: five FPN levels, in = out = 256, C_m = 256, the coarsest ABF does not fuse
    abfs = [ABF(256, 256, 256, fuse=i < 4) for i in range(5)]
    assert sum(p.numel() for abf in abfs for p in abf.parameters()) == 3_286_024


def test_abf_matches_functional_formula():
    torch.manual_seed(0)
    abf = ABF(6, 8, 5, fuse=True).eval()
    for bn in (abf.conv1[1], abf.conv2[1]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    x, res = torch.randn(2, 6, 4, 4), torch.randn(2, 8, 2, 2)

    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    x1 = bn(F.conv2d(x, abf.conv1[0].weight), abf.conv1[1])
    y = res.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2→4
    z = torch.sigmoid(F.conv2d(torch.cat([x1, y], 1), abf.att_conv[0].weight, abf.att_conv[0].bias))
    fused = x1 * z[:, :1] + y * z[:, 1:]
    fused = fused.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # out_shape 4→8
    out = bn(F.conv2d(fused, abf.conv2[0].weight, padding=1), abf.conv2[1])
    got_out, got_res = abf(x, res, shape=4, out_shape=8)
    torch.testing.assert_close(got_out, out)
    torch.testing.assert_close(got_res, fused)


def test_abf_zero_attention_averages_and_1x1_residual_is_constant():
    torch.manual_seed(0)
    abf = ABF(4, 6, 3, fuse=True).eval()
    nn.init.zeros_(abf.att_conv[0].weight)
    nn.init.zeros_(abf.att_conv[0].bias)
    x, res = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 1, 1)
    _, fused = abf(x, res)
    x1 = abf.conv1(x)
    torch.testing.assert_close(fused, 0.5 * x1 + 0.5 * res.expand_as(x1))
    const = fused - 0.5 * x1  # the resized 1×1 residual, halved: constant over H, W
    torch.testing.assert_close(const, const[..., :1, :1].expand_as(const))
    torch.testing.assert_close(const[..., 0, 0], 0.5 * res[..., 0, 0])


def test_abf_sum_fusion_ablation():
    abf = ABF(4, 6, 3, fuse=True, fusion="sum").eval()
    assert abf.att_conv is None and sum(p.numel() for p in abf.parameters()) == _abf_params(4, 6, 3, False)
    x, res = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)
    _, fused = abf(x, res)
    torch.testing.assert_close(fused, abf.conv1(x) + res.repeat_interleave(2, 2).repeat_interleave(2, 3))
    with pytest.raises(ConfigError, match="fusion must be one of"):
        ABF(4, 6, 3, fuse=True, fusion="concat")


def test_abf_out_shape_attention_size_and_errors():
    abf = ABF(4, 6, 3, fuse=True)
    seen = {}
    abf.att_conv.register_forward_hook(lambda m, a, o: seen.update(z=o.shape))
    out, res = abf(torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2), shape=4, out_shape=8)
    assert seen["z"] == (2, 2, 4, 4)  # attention at the student size, before the out_shape resize
    assert out.shape == (2, 3, 8, 8) and res.shape == (2, 6, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(8, 8\) must equal the student feature size \(4, 4\)"):
        abf(torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2), shape=8)
    with pytest.raises(ValueError, match="needs the residual"):
        abf(torch.randn(2, 4, 4, 4))


# --- per-pair configuration ------------------------------------------------------------------------

# (teacher, student, in, out, shapes, out_shapes, C_m, per-ABF params deep→shallow or None, total)
CIFAR_PAIRS = [
    ("resnet56", "resnet20", [16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32], 64,
     [41_216, 41_474, 20_930, 10_658], 114_278),
    ("resnet110", "resnet32", [16, 32, 64, 64], [16, 32, 64, 64], [1, 8, 16, 32], [1, 8, 16, 32], 64,
     [41_216, 41_474, 20_930, 10_658], 114_278),
    ("resnet32x4", "resnet8x4", [64, 128, 256, 256], [64, 128, 256, 256], [1, 8, 16, 32], [1, 8, 16, 32], 256,
     [656_384, 657_410, 329_474, 165_506], 1_808_774),
    ("wrn_40_2", "wrn_16_2", [32, 64, 128, 128], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32], 128,
     [164_352, 164_866, 82_818, 41_794], 453_830),
    ("wrn_40_2", "wrn_40_1", [16, 32, 64, 64], [32, 64, 128, 128], [1, 8, 16, 32], [1, 8, 16, 32], 64,
     [78_208, 78_466, 39_426, 19_906], 216_006),
    ("vgg13", "vgg8", [128, 256, 512, 512, 512], [128, 256, 512, 512, 512], [1, 4, 4, 8, 16], [1, 4, 4, 8, 16], 512,
     [2_623_488, 2_625_538, 2_625_538, 1_314_306, 658_690], 9_847_560),
    ("resnet50", "mobile_half", [12, 16, 48, 160, 1280], [256, 512, 1024, 2048, 2048], [1, 2, 4, 8, 16],
     [1, 4, 8, 16, 32], 512, [10_097_664, 9_526_274, 4_748_290, 2_371_586, 1_189_378], 27_933_192),
    ("vgg13", "mobile_half", [12, 16, 48, 160, 1280], [128, 256, 512, 512, 512], [1, 2, 4, 8, 16],
     [1, 4, 4, 8, 16], 512, [3_016_704, 2_445_314, 2_387_970, 1_191_426, 599_298], 9_640_712),
    ("resnet50", "vgg8", [128, 256, 512, 512, 512], [256, 512, 1024, 2048, 2048], [1, 4, 4, 8, 16],
     [1, 4, 8, 16, 32], 512, None, 28_140_040),
    ("resnet32x4", "shufflev1", [240, 480, 960, 960], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32], 512,
     [1_672_704, 1_674_754, 838_914, 420_994], 4_607_366),
    ("wrn_40_2", "shufflev1", [240, 480, 960, 960], [32, 64, 128, 128], [1, 4, 8, 16], [1, 8, 16, 32], 512,
     [1_082_624, 1_084_674, 543_874, 273_474], 2_984_646),
    ("resnet32x4", "shufflev2", [116, 232, 464, 1024], [64, 128, 256, 256], [1, 4, 8, 16], [1, 8, 16, 32], 512,
     [1_705_472, 1_420_802, 711_938, 357_506], 4_195_718),
]  # fmt: skip


def _need(*names: str) -> None:
    missing = [n for n in names if n not in list_models()]
    if missing:
        pytest.skip(f"models not in the zoo yet: {missing}")


def _check_pair(method: ReviewKD, student, teacher, image: int, c_m, per_abf, total) -> None:
    """Structure (ABF count and fusion, channels, C_m, parameter counts) and a forward of a batch of two through the Distiller."""
    n = len(method.in_channels)
    assert method.mid_channels == c_m
    assert len(method.abfs) == n
    assert [abf.att_conv is None for abf in method.abfs] == [True] + [False] * (n - 1)
    assert {id(p) for p in method.parameters()} == {id(p) for p in method.abfs.parameters()}
    if per_abf is not None:
        assert [sum(p.numel() for p in abf.parameters()) for abf in method.abfs] == per_abf
    assert sum(p.numel() for p in method.parameters()) == total
    assert "stem" not in method.student_features and "stem" not in method.teacher_features

    # one training-mode forward of a batch of two; hooks record what each ABF sees and returns
    distiller = Distiller(student, [teacher], method).train()
    seen: dict[object, dict[str, tuple]] = {k: {} for k in range(n)}
    method.register_forward_hook(
        lambda m, args, out: seen.update(
            inputs={
                "student": [tuple(args[1].features[k].shape) for k in method.student_features],
                "teacher": [tuple(args[2][0].features[k].shape) for k in method.teacher_features],
            }
        )
    )
    for k, abf in enumerate(method.abfs):
        abf.register_forward_hook(lambda m, a, o, k=k: seen[k].update(student=tuple(a[0].shape), out=tuple(o[0].shape)))
        abf.conv2.register_forward_hook(lambda m, a, o, k=k: seen[k].update(residual=tuple(a[0].shape)))
        if abf.att_conv is not None:
            abf.att_conv.register_forward_hook(lambda m, a, o, k=k: seen[k].update(z=tuple(o.shape)))
    torch.manual_seed(0)
    batch = Batch(torch.randn(2, 3, image, image), torch.tensor([0, 1]))
    with torch.no_grad():
        losses = distiller.forward_train(batch, StepInfo(epoch=30))[1]
    assert set(losses) == {"ce", "reviewkd"} and all(torch.isfinite(v) for v in losses.values())
    s_shapes, t_shapes = seen["inputs"]["student"][::-1], seen["inputs"]["teacher"][::-1]  # deep → shallow
    for k in range(n):
        # ABF[k] gets student stage K+1-k (pooled first) and returns its teacher target's C×H×W
        assert seen[k]["student"][1:] == (s_shapes[k] + (1, 1))[1:4]
        assert seen[k]["out"][1:] == (t_shapes[k] + (1, 1))[1:4]
        assert seen[k]["residual"][1] == c_m
        if k:  # attention at the student size, before any out_shape resize
            assert seen[k]["z"] == (2, 2, *s_shapes[k][2:])
        if image == method.input_size[-1]:  # shapes[k] is the student size fed to ABF[k]
            assert seen[k]["student"][2:] == tuple(method.shapes[k])


@pytest.mark.parametrize(
    ("teacher", "student", "c_in", "c_out", "shapes", "out_shapes", "c_m", "per_abf", "total"),
    CIFAR_PAIRS,
    ids=[f"{p[0]}-{p[1]}" for p in CIFAR_PAIRS],
)
def test_cifar_pair(teacher, student, c_in, c_out, shapes, out_shapes, c_m, per_abf, total):
    _need(f"cifar.{teacher}", f"cifar.{student}")
    torch.manual_seed(0)
    s, t = kdistill.create_model(f"cifar.{student}"), kdistill.create_model(f"cifar.{teacher}")
    # the explicit lists of the released configs are accepted (they are validated against the probe)
    method = kdistill.build_method(
        "reviewkd", student=s, teachers=[t], input_size=(3, 32, 32),
        in_channels=c_in, out_channels=c_out, shapes=shapes, out_shapes=out_shapes,
    )  # fmt: skip
    assert method.in_channels == c_in and method.out_channels == c_out
    assert [h for h, _ in method.shapes] == shapes and [h for h, _ in method.out_shapes] == out_shapes
    _check_pair(method, s, t, 32, c_m, per_abf, total)


IMAGENET_PAIRS = [
    # (teacher, student, options, C_m, in, out, total)
    ("torchvision.resnet34", "torchvision.resnet18", {}, 512, [64, 128, 256, 512, 512],
     [64, 128, 256, 512, 512], 7_552_904),
    ("torchvision.resnet50", "imagenet.mobilenet_v1", {"mid_channels": 256}, 256, [128, 256, 512, 1024, 1024],
     [256, 512, 1024, 2048, 2048], 14_338_056),
]  # fmt: skip


@pytest.mark.parametrize(
    ("teacher", "student", "options", "c_m", "c_in", "c_out", "total"), IMAGENET_PAIRS, ids=["r34-r18", "r50-mv1"]
)
def test_imagenet_pair(teacher, student, options, c_m, c_in, c_out, total):
    if student.startswith("imagenet."):
        _need(student)
    torch.manual_seed(0)
    s, t = kdistill.create_model(student, num_classes=1000), kdistill.create_model(teacher, num_classes=1000)
    method = kdistill.build_method(
        "reviewkd", student=s, teachers=[t], input_size=(3, 224, 224),
        student_preact=True, teacher_preact=True, warmup_epochs=0, **options,
    )  # fmt: skip
    assert method.in_channels == c_in and method.out_channels == c_out
    assert [h for h, _ in method.shapes] == [1, 7, 14, 28, 56] == [h for h, _ in method.out_shapes]
    assert method.student_taps() == {k: v for k, v in stage_taps(s, preact=True).items() if k != "stem"}
    # the review chain sizes itself from the tensors, so the forward check runs on 64×64 images to stay fast
    _check_pair(method, s, t, 64, c_m, None, total)
    if student == "imagenet.mobilenet_v1":  # mdistiller ignores MAX_MID_CHANNEL: C_m = 512
        wide = kdistill.build_method("reviewkd", student=s, teachers=[t], input_size=(3, 64, 64), student_preact=True)
        assert wide.mid_channels == 512 and sum(p.numel() for p in wide.parameters()) == 28_664_328


# --- training step ------------------------------------------------------------------------------------


def _small_pair(**options):
    torch.manual_seed(0)
    student, teacher = kdistill.create_model("cifar.resnet8"), kdistill.create_model("cifar.resnet14")
    method = kdistill.build_method("reviewkd", student=student, teachers=[teacher], **options)
    return student, teacher, method, Distiller(student, [teacher], method).train()


def _batch(n: int = 4) -> Batch:
    torch.manual_seed(1)
    return Batch(torch.randn(n, 3, 32, 32), torch.arange(n) % 100)


def test_step_gradients_reach_student_and_abfs_never_teacher():
    student, teacher, method, distiller = _small_pair(loss_weight=2.0)
    t_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    _, losses = distiller.forward_train(_batch(), StepInfo(epoch=25))
    sum(losses.values()).backward()
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in distiller.trainable_parameters()} == {
        *(id(p) for p in student.parameters()),
        *(id(p) for p in method.abfs.parameters()),
    }
    for name, p in [*student.named_parameters(), *method.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the pooled ABF's 3×3 conv sees a 1×1 map: only its centre tap is trained
    g = method.abfs[0].conv2[0].weight.grad
    off_centre = g.clone()
    off_centre[..., 1, 1] = 0
    assert g[..., 1, 1].abs().sum() > 0 and off_centre.abs().max() == 0
    opt.step()
    for k, v in teacher.state_dict().items():  # teacher weights and BN buffers untouched (eval mode)
        torch.testing.assert_close(v, t_state[k], rtol=0, atol=0)


def test_residual_chain_carries_gradient_to_deeper_abfs():
    student, teacher, method, distiller = _small_pair()
    s_out = distiller.student_forward(_batch().images)
    t_out = distiller.teacher_outputs(_batch().images, [0])[0]
    outputs = method.review(
        [s_out.features[k] for k in method.student_features], [t_out.features[k] for k in method.teacher_features]
    )
    outputs[0].square().sum().backward()  # the shallowest output only (stage1, made by abfs[-1])
    pooled_abf = method.abfs[0]
    assert pooled_abf.conv1[0].weight.grad.abs().sum() > 0  # reached through every residual
    assert pooled_abf.conv2[0].weight.grad is None  # its own output is not part of this loss
    assert student.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_loss_assembly_and_zero_weight():
    student, teacher, method, distiller = _small_pair(loss_weight=3.0, ce_weight=0.5)
    method.eval()  # BN on running statistics so repeated passes agree
    batch = _batch()
    s_out = distiller.student_forward(batch.images)
    t_out = distiller.teacher_outputs(batch.images, [0])[0]
    losses = method(batch, s_out, [t_out], StepInfo(epoch=10))
    s_feats = [s_out.features[k] for k in method.student_features]
    t_feats = [t_out.features[k] for k in method.teacher_features]
    review = hcl_loss(method.review(s_feats, t_feats), t_feats)
    torch.testing.assert_close(losses["ce"], 0.5 * F.cross_entropy(s_out.logits, batch.targets))
    torch.testing.assert_close(losses["reviewkd"], 3.0 * 0.5 * review)
    later = method(batch, s_out, [t_out], StepInfo(epoch=40))["reviewkd"]
    torch.testing.assert_close(later, 3.0 * review)
    # the stem is never read: a features dict with a different stem gives the same loss
    noisy = ModelOutput(s_out.logits, {**s_out.features, "stem": torch.randn(4, 16, 32, 32)})
    torch.testing.assert_close(method(batch, noisy, [t_out], StepInfo(epoch=40))["reviewkd"], later)

    _, _, method0, distiller0 = _small_pair(loss_weight=0.0)
    sum(distiller0.forward_train(_batch(), StepInfo(epoch=30))[1].values()).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in method0.parameters())


def test_taps_follow_preact_flags_and_inference_is_student_only():
    student, teacher, method, distiller = _small_pair()
    assert method.student_taps() == {k: v for k, v in stage_taps(student, False).items() if k != "stem"}
    assert method.teacher_taps(0) == {k: v for k, v in stage_taps(teacher, True).items() if k != "stem"}
    assert "+" in method.teacher_taps(0)["stage1"]  # residual sum before the last ReLU
    flipped = kdistill.build_method(
        "reviewkd", student=student, teachers=[teacher], student_preact=True, teacher_preact=False
    )
    assert flipped.student_taps()["stage3"] != method.student_taps()["stage3"]
    assert flipped.teacher_taps(0)["stage3"] == "layer3"
    distiller.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(distiller(x), student(x))
    assert not any("abf" in k for k in student.state_dict())


@pytest.mark.parametrize(
    ("base", "table"),
    [
        (0, {0: 0.0, 1: 0.05, 10: 0.5, 19: 0.95, 20: 1.0, 239: 1.0}),
        (1, {0: 0.05, 1: 0.1, 18: 0.95, 19: 1.0, 20: 1.0}),  # mdistiller's epochs 1, 2, 19, 20, 21
    ],
)
def test_warmup_factor(base, table):
    _, _, method, _ = _small_pair(warmup_epoch_base=base)
    for epoch, factor in table.items():
        assert method.warmup_factor(epoch) == pytest.approx(factor, abs=1e-12), epoch
    _, _, none, _ = _small_pair(warmup_epochs=0)
    assert none.warmup_factor(0) == 1.0


def test_official_first_epoch_has_no_review_loss():
    _, _, method, distiller = _small_pair(loss_weight=5.0)
    _, losses = distiller.forward_train(_batch(), StepInfo(epoch=0))
    assert losses["reviewkd"].item() == 0.0 and losses["ce"].item() > 0


def test_batch_of_one_is_rejected_in_training():
    _, _, _, distiller = _small_pair()
    with pytest.raises(ValueError, match="batch of at least 2"):
        distiller.forward_train(_batch(1), StepInfo(epoch=30))


# --- configuration errors ---------------------------------------------------------------------------


def test_stage_count_mismatch_names_every_stage():
    _need("cifar.vgg13")
    s, t = kdistill.create_model("cifar.resnet20"), kdistill.create_model("cifar.vgg13")
    with pytest.raises(ConfigError) as err:
        kdistill.build_method("reviewkd", student=s, teachers=[t])
    msg = str(err.value)
    assert "student has 3 stages" in msg and "teacher has 4 stages" in msg
    for part in ("stage1 16x32x32", "stage3 64x8x8", "pooled 64x1x1", "stage1 128x16x16", "stage4 512x4x4"):
        assert part in msg


def test_student_larger_than_teacher_is_rejected():
    _need("cifar.shufflev1")
    s, t = kdistill.create_model("cifar.resnet20"), kdistill.create_model("cifar.shufflev1")
    with pytest.raises(ConfigError) as err:
        kdistill.build_method("reviewkd", student=s, teachers=[t])
    msg = str(err.value)
    assert "student stage1 16x32x32 vs teacher stage1 240x16x16: student map larger" in msg
    assert "student stage3 64x8x8 vs teacher stage3 960x4x4" in msg


class _Tiny(nn.Module):
    def __init__(self, stride: int, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


TINY_TAPS = {"stage1": "body", "pooled": "pool"}


def test_non_integer_ratio_and_disabled_resize_are_rejected():
    opts = {"input_size": (3, 12, 12), "student_taps": TINY_TAPS, "teacher_taps": TINY_TAPS}
    with pytest.raises(
        ConfigError, match=r"student stage1 4x4x4 vs teacher stage1 8x6x6: teacher size is not an integer"
    ):
        kdistill.build_method("reviewkd", student=_Tiny(3, 4), teachers=[_Tiny(2, 8)], **opts)
    with pytest.raises(
        ConfigError, match=r"student stage1 4x6x6 vs teacher stage1 8x12x12: sizes differ and resize_to_teacher"
    ):
        kdistill.build_method("reviewkd", student=_Tiny(2, 4), teachers=[_Tiny(1, 8)], resize_to_teacher=False, **opts)
    # user models with explicit taps work: 6 → 12 needs the out_shape resize on the only stage
    ok = kdistill.build_method("reviewkd", student=_Tiny(2, 4), teachers=[_Tiny(1, 8)], **opts)
    assert ok.shapes == [(1, 1), (6, 6)] and ok.out_shapes == [(1, 1), (12, 12)] and ok.mid_channels == 4


def test_explicit_lists_are_validated():
    s, t = kdistill.create_model("cifar.resnet20"), kdistill.create_model("cifar.resnet56")
    with pytest.raises(
        ConfigError, match=r"shapes=\[1, 8, 16, 32, 32\] does not match the probed models: \[1, 8, 16, 32\]"
    ):
        kdistill.build_method("reviewkd", student=s, teachers=[t], shapes=[1, 8, 16, 32, 32])
    with pytest.raises(ConfigError, match=r"in_channels=\[16, 32, 64, 128\] .* \[16, 32, 64, 64\]"):
        kdistill.build_method("reviewkd", student=s, teachers=[t], in_channels=[16, 32, 64, 128])
    with pytest.raises(ConfigError, match="exactly one teacher"):
        kdistill.build_method("reviewkd", student=s, teachers=[t, t])
    with pytest.raises(ConfigError, match="warmup_epoch_base must be 0"):
        kdistill.build_method("reviewkd", student=s, teachers=[t], warmup_epoch_base=2)
    explicit = kdistill.build_method("reviewkd", student=s, teachers=[t], mid_channels=32, max_mid_channels=16)
    assert explicit.mid_channels == 32
    capped = kdistill.build_method("reviewkd", student=s, teachers=[t], max_mid_channels=16)
    assert capped.mid_channels == 16


# --- recipes -----------------------------------------------------------------------------------------

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# λ per pair (docs/methods/reviewkd.md; unverified pairs as chosen in the recipe comments) and lr 0.01 for MobileNet/ShuffleNet
RECIPE_LAMBDA = {
    "resnet56-resnet20": 0.6, "resnet110-resnet32": 1.0, "resnet32x4-resnet8x4": 5.0, "wrn_40_2-wrn_16_2": 5.0,
    "wrn_40_2-wrn_40_1": 5.0, "vgg13-vgg8": 5.0, "resnet50-mobile_half": 30.0, "vgg13-mobile_half": 5.0,
    "resnet50-vgg8": 5.0, "resnet32x4-shufflev1": 5.0, "wrn_40_2-shufflev1": 5.0, "resnet32x4-shufflev2": 8.0,
}  # fmt: skip


def test_cifar_recipes_follow_the_spec_and_build():
    paths = sorted((RECIPES / "cifar100" / "reviewkd").glob("*.yaml"))
    assert {p.stem for p in paths} == set(RECIPE_LAMBDA)
    for path in paths:
        recipe = load_recipe(path)
        options = recipe["method"]["options"]
        student = recipe["student"]["model"]
        assert recipe["method"]["name"] == "reviewkd" and options["loss_weight"] == RECIPE_LAMBDA[path.stem], path.stem
        assert options["warmup_epochs"] == 20 and recipe["trainer"]["max_epochs"] == 240
        slow = ("mobile", "shuffle")
        assert recipe["optim"]["lr"] == (0.01 if any(k in student for k in slow) else 0.05), path.stem
        s = kdistill.create_model(student)
        t = kdistill.create_model(recipe["teachers"][0]["model"])
        method = kdistill.build_method("reviewkd", student=s, teachers=[t], **options)
        assert method.loss_weight == RECIPE_LAMBDA[path.stem]


def test_imagenet_recipes():
    expected = {"resnet34-resnet18": (1.0, 512), "resnet50-mobilenet_v1": (8.0, 256)}
    for name, (lam, c_m) in expected.items():
        recipe = load_recipe(RECIPES / "imagenet" / "reviewkd" / f"{name}.yaml")
        options = recipe["method"]["options"]
        assert options["loss_weight"] == lam and options.get("mid_channels", 512) == c_m
        assert options["warmup_epochs"] == 0 and options["student_preact"] and options["teacher_preact"]
        assert recipe["optim"]["lr"] == 0.1 and recipe["optim"]["milestones"] == [30, 60, 90]
        assert recipe["trainer"]["max_epochs"] == 100 and recipe["data"]["batch_size"] == 256
