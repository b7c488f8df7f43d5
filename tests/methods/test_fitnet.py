"""FitNet: the hint loss, the ConvReg regressor's kinds and sizes, and the method's regressor."""

from __future__ import annotations

import pytest
import torch

from kdistill import build_method, create_model, list_models
from kdistill.losses import fitnet_loss
from kdistill.methods.fitnet import ConvReg

D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- FitNet ---------------------------------------------------------------------------------------


def test_fitnet_loss_value_and_shape_check():
    a, b = _rand(2, 3, 4, 4, seed=22), _rand(2, 3, 4, 4, seed=23)
    assert fitnet_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / a.numel(), rel=1e-12)
    with pytest.raises(ValueError, match="must equal"):
        fitnet_loss(a, b[:, :2])


# (student C, H), (teacher C, H), kind, parameter count of the benchmark pairs (docs/methods/fitnet.md)
CONVREG_TABLE = [
    ((64, 16), (64, 16), "conv", 4_288),  # WRN-40-2 → WRN-16-2
    ((32, 16), (64, 16), "conv", 2_240),  # WRN-40-2 → WRN-40-1
    ((32, 16), (32, 16), "conv", 1_120),  # resnet56/110 → resnet20/32
    ((128, 16), (128, 16), "conv", 16_768),  # resnet32x4 → resnet8x4
    ((256, 8), (256, 8), "conv", 66_304),  # vgg13 → vgg8
    ((16, 8), (256, 8), "conv", 4_864),  # vgg13 → MobileNetV2
    ((16, 8), (512, 16), "deconv4x4_s2", 132_608),  # ResNet50 → MobileNetV2
    ((256, 8), (512, 16), "deconv4x4_s2", 2_098_688),  # ResNet50 → vgg8
    ((480, 8), (128, 16), "deconv4x4_s2", 983_424),  # resnet32x4 → ShuffleV1
    ((232, 8), (128, 16), "deconv4x4_s2", 475_520),  # resnet32x4 → ShuffleV2
    ((480, 8), (64, 16), "deconv4x4_s2", 491_712),  # WRN-40-2 → ShuffleV1
]


@pytest.mark.parametrize(("student", "teacher", "kind", "params"), CONVREG_TABLE)
def test_convreg_kinds_and_parameter_counts(student, teacher, kind, params):
    reg = ConvReg((student[0], student[1], student[1]), (teacher[0], teacher[1], teacher[1]))
    assert reg.kind == kind
    assert sum(p.numel() for p in reg.parameters()) == params


def test_convreg_other_sizes_and_output_shapes():
    reg = ConvReg((8, 16, 16), (12, 8, 8))  # student twice the teacher: 3×3 stride-2 conv
    assert reg.kind == "conv3x3_s2" and reg(torch.randn(2, 8, 16, 16)).shape == (2, 12, 8, 8)
    reg = ConvReg((8, 10, 7), (12, 8, 4))  # larger in both axes: kernel (3, 4)
    assert reg.conv.kernel_size == (3, 4) and reg(torch.randn(2, 8, 10, 7)).shape == (2, 12, 8, 4)
    reg = ConvReg((8, 4, 4), (12, 8, 8))
    out = reg(torch.randn(2, 8, 4, 4))
    assert out.shape == (2, 12, 8, 8) and (out >= 0).all()  # BN then ReLU
    for bad_student, bad_teacher in [((8, 8, 8), (8, 32, 32)), ((8, 8, 8), (8, 12, 12)), ((8, 8, 4), (8, 6, 6))]:
        with pytest.raises(ValueError, match="cannot map"):
            ConvReg(bad_student, bad_teacher)


def _zoo_has(*names: str) -> bool:
    return all(n in list_models() for n in names)


@pytest.mark.skipif(not _zoo_has("cifar.shufflev1", "cifar.resnet8x4"), reason="ShuffleV1 not in the zoo")
def test_fitnet_regressor_for_cross_architecture_pair():
    """resnet8x4 teacher (stage2 128 channels, 2× the size) → ShuffleV1 student (stage2 480 channels)."""
    torch.manual_seed(0)
    student, teacher = create_model("cifar.shufflev1"), create_model("cifar.resnet8x4")
    method = build_method("fitnet", student=student, teachers=[teacher], input_size=(3, 16, 16))
    assert method.regressor.kind == "deconv4x4_s2"
    assert sum(p.numel() for p in method.regressor.parameters()) == 983_424  # as resnet32x4 → ShuffleV1
    assert method.regressor(torch.randn(2, 480, 8, 8)).shape == (2, 128, 16, 16)


def test_fitnet_unsupported_ratio_is_a_clear_error():
    student, teacher = create_model("cifar.resnet8", num_classes=10), create_model("cifar.resnet8", num_classes=10)
    # student hint = stage3 (8×8) vs teacher stage1 (32×32): a 4× ratio
    with pytest.raises(ValueError, match="cannot map a student hint of size 8×8 to a teacher hint of size 32×32"):
        build_method("fitnet", student=student, teachers=[teacher], hint_layer=3, teacher_taps={"stage3": "layer1"})
