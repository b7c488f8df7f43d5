"""Classic baselines DKD, AT, SP, PKT, RKD, NST, FitNet: losses, methods, recipes (baselines spec §2, §9).

Every loss is checked against the hand-computed values of the spec's §9 checklist and against a
second formulation written here (loops or a different algebraic form, float64).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kdistill import build_method, create_model, list_models
from kdistill.features import FeatureRecorder, stage_taps
from kdistill.losses import at_loss, dkd_loss, fitnet_loss, kd_loss, nst_loss, pkt_loss, rkd_loss, sp_loss
from kdistill.methods import Batch, ModelOutput, StepInfo, method_options
from kdistill.methods.fitnet import ConvReg
from kdistill.recipes import load_recipe
from kdistill.step import Distiller
from kdistill.utils import ConfigError

MY_METHODS = ("dkd", "at", "sp", "pkt", "rkd", "nst", "fitnet")
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "cifar100"
D = torch.float64


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


# --- DKD (§2.8, §9 item 2) ----------------------------------------------------------------------


def test_dkd_hand_values_and_kd_identity():
    zs, y = torch.zeros(1, 3), torch.tensor([0])
    t1 = torch.tensor([[math.log(2), 0.0, 0.0]])  # p_t = [.5, .25, .25]: NCKD = 0
    tckd = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    assert dkd_loss(zs, t1, y, alpha=1, beta=8, temperature=1).item() == pytest.approx(tckd, abs=1e-5)
    assert tckd == pytest.approx(0.058892, abs=1e-6)
    assert kd_loss(zs, t1, 1).item() == pytest.approx(0.058892, abs=1e-5)

    t2 = torch.tensor([[math.log(2), math.log(3), 0.0]])  # p_t = [1/3, 1/2, 1/6]: TCKD = 0
    assert dkd_loss(zs, t2, y, alpha=1, beta=1, temperature=1).item() == pytest.approx(0.130812, abs=1e-5)
    assert dkd_loss(zs, t2, y, alpha=1, beta=0, temperature=1).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(zs, t2, 1).item() == pytest.approx(0.087208, abs=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_identity_kd_equals_tckd_plus_weighted_nckd(temperature):
    """KD = TCKD + (1 − p^t_y)·NCKD per sample, at the same T (spec §2.8), on random logits."""
    s, t = _rand(5, 7, seed=1) * 3, _rand(5, 7, seed=2) * 3
    y = torch.tensor([0, 3, 6, 2, 2])
    for b in range(5):
        sb, tb, yb = s[b : b + 1], t[b : b + 1], y[b : b + 1]
        pt_y = F.softmax(tb / temperature, 1)[0, yb].item()
        tckd = dkd_loss(sb, tb, yb, alpha=1, beta=0, temperature=temperature)
        nckd = dkd_loss(sb, tb, yb, alpha=0, beta=1, temperature=temperature)
        kd = kd_loss(sb.float(), tb.float(), temperature).double()
        assert (tckd + (1 - pt_y) * nckd).item() == pytest.approx(kd.item(), rel=1e-5)
        # the same through alpha/beta in one call
        both = dkd_loss(sb, tb, yb, alpha=1, beta=1 - pt_y, temperature=temperature)
        assert both.item() == pytest.approx(kd.item(), rel=1e-5)


def _dkd_probability_space(s, t, y, alpha, beta, T):
    """The reference's formulation: probabilities, a −1000 target mask, log of the binary split."""
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * T**2
    log_ps_hat = F.log_softmax(s / T - 1000.0 * gt, 1)
    pt_hat = F.softmax(t / T - 1000.0 * gt, 1)
    nckd = (pt_hat * (pt_hat.clamp_min(1e-300).log() - log_ps_hat)).sum(1).mean() * T**2
    return alpha * tckd + beta * nckd


def test_dkd_matches_probability_space_formulation():
    s, t = _rand(6, 10, seed=3), _rand(6, 10, seed=4) * 2
    y = torch.tensor([0, 1, 9, 4, 4, 7])
    for alpha, beta, T in [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)]:
        ref = _dkd_probability_space(s, t, y, alpha, beta, T)
        assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(ref.item(), rel=1e-9)


def test_dkd_log_space_does_not_underflow():
    """A student target probability e^-200 underflows float32; log space stays exact (defect #6)."""
    s = torch.tensor([[-200.0, 0.0, 0.0]], requires_grad=True)
    t = torch.zeros(1, 3)
    loss = dkd_loss(s, t, torch.tensor([0]), alpha=1, beta=1, temperature=1)
    # TCKD = 1/3·(ln 1/3 + 200 + ln 2) + 2/3·ln(2/3); NCKD = 0 (both uniform over non-targets)
    assert loss.item() == pytest.approx(200 / 3 + math.log(2 / 3), rel=1e-6)
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_dkd_bad_inputs():
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]), temperature=0)
    with pytest.raises(ValueError, match="equal shape"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        dkd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1, 2]))


# --- AT (§2.3, §9 item 3) -------------------------------------------------------------------------


def test_at_hand_values():
    s = torch.zeros(1, 3, 2, 2)
    s[:, :, 0, 0] = 1.0  # a(s) = [1, 0, 0, 0]; a(t) = [.5, .5, .5, .5]
    assert at_loss(s, torch.ones(1, 5, 2, 2)).item() == pytest.approx(0.25, abs=1e-5)
    # 4×4 constant vs 2×2 constant, different channel counts: pooled, identical attention
    assert at_loss(torch.full((2, 3, 4, 4), 2.0), torch.ones(2, 7, 2, 2)).item() == pytest.approx(0.0, abs=1e-7)


def _at_loops(s, t, p=2):
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        a_s = (s[b] ** p).sum(0).flatten() / s.shape[1]
        a_t = (t[b] ** p).sum(0).flatten() / t.shape[1]
        a_s, a_t = a_s / a_s.norm(), a_t / a_t.norm()
        total += ((a_s - a_t) ** 2).sum().item()
        count += a_s.numel()
    return total / count


def test_at_matches_loops_with_fixed_kernel_pooling():
    s, t = _rand(3, 4, 8, 8, seed=5), _rand(3, 6, 4, 4, seed=6)
    assert at_loss(s, t).item() == pytest.approx(_at_loops(F.avg_pool2d(s, 2), t), rel=1e-9)
    # rectangular maps pool per axis to (min H, min W) (defect #8): 8×6 vs 4×6 → kernel (2, 1)
    s2, t2 = _rand(2, 3, 8, 6, seed=7), _rand(2, 5, 4, 6, seed=8)
    assert at_loss(s2, t2).item() == pytest.approx(_at_loops(F.avg_pool2d(s2, (2, 1)), t2), rel=1e-9)
    assert at_loss(t2, s2).item() == pytest.approx(_at_loops(t2, F.avg_pool2d(s2, (2, 1))), rel=1e-9)
    assert at_loss(s, t, p=4).item() == pytest.approx(_at_loops(F.avg_pool2d(s, 2), t, p=4), rel=1e-9)


# --- SP (§2.4, §9 item 4) -------------------------------------------------------------------------


def test_sp_hand_value():
    fs, ft = torch.eye(2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp_loss(fs, ft).item() == pytest.approx((2 - math.sqrt(2)) / 2, abs=1e-5)
    assert (2 - math.sqrt(2)) / 2 == pytest.approx(0.292893, abs=1e-6)


def test_sp_matches_loops():
    s, t = _rand(5, 3, 4, 4, seed=9), _rand(5, 8, 2, 2, seed=10)
    B = 5
    fs, ft = s.reshape(B, -1), t.reshape(B, -1)
    total = 0.0
    for i in range(B):
        gs = torch.tensor([float(fs[i] @ fs[j]) for j in range(B)], dtype=D)
        gt = torch.tensor([float(ft[i] @ ft[j]) for j in range(B)], dtype=D)
        total += ((gt / gt.norm() - gs / gs.norm()) ** 2).sum().item()
    assert sp_loss(s, t).item() == pytest.approx(total / B**2, rel=1e-9)


# --- PKT (§2.6, §9 item 5) ------------------------------------------------------------------------


def test_pkt_identical_is_zero_and_matches_loops():
    f = _rand(6, 16, seed=11)
    assert pkt_loss(f, f).item() == pytest.approx(0.0, abs=1e-12)
    s, t = _rand(4, 5, seed=12), _rand(4, 9, seed=13)
    eps, B = 1e-7, 4

    def q(x):
        unit = [x[i] / (x[i].norm() + eps) for i in range(B)]
        sim = [[(float(unit[i] @ unit[j]) + 1) / 2 for j in range(B)] for i in range(B)]
        return [[sim[i][j] / sum(sim[i]) for j in range(B)] for i in range(B)]

    qs, qt = q(s), q(t)
    ref = sum(qt[i][j] * math.log((qt[i][j] + eps) / (qs[i][j] + eps)) for i in range(B) for j in range(B)) / B**2
    assert pkt_loss(s, t).item() == pytest.approx(ref, rel=1e-9)
    assert ref > 0


# --- RKD (§2.5, §9 item 6) ------------------------------------------------------------------------


def test_rkd_invariant_to_scale_and_translation():
    f = _rand(8, 12, seed=14)
    assert rkd_loss(3 * f, f).item() <= 1e-9
    assert rkd_loss(f + 5, f).item() <= 1e-9
    assert rkd_loss(_rand(8, 12, seed=15), f).item() > 1e-3


def _smooth_l1(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def test_rkd_matches_loops():
    s, t = _rand(4, 3, seed=16), _rand(4, 6, seed=17)
    B = 4

    def potentials(e):
        d = [[float((e[i] - e[j]).norm()) for j in range(B)] for i in range(B)]
        mu = sum(d[i][j] for i in range(B) for j in range(B) if i != j) / (B * (B - 1))
        dist = [d[i][j] / mu for i in range(B) for j in range(B)]
        angle = []
        for i in range(B):
            for j in range(B):
                for k in range(B):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = float(u.norm()), float(v.norm())
                    angle.append(0.0 if nu == 0 or nv == 0 else float(u @ v) / (nu * nv))
        return dist, angle

    (ds, as_), (dt, at_) = potentials(s), potentials(t)
    l_d = sum(_smooth_l1(a, b) for a, b in zip(ds, dt, strict=True)) / B**2
    l_a = sum(_smooth_l1(a, b) for a, b in zip(as_, at_, strict=True)) / B**3
    assert rkd_loss(s, t).item() == pytest.approx(25 * l_d + 50 * l_a, rel=1e-6)
    assert rkd_loss(s, t, 1.0, 0.0).item() == pytest.approx(l_d, rel=1e-6)
    assert rkd_loss(s, t, 0.0, 1.0).item() == pytest.approx(l_a, rel=1e-6)


# --- NST (§2.10, §9 item 7) -----------------------------------------------------------------------


def test_nst_identical_is_zero_and_channels_may_differ():
    f = _rand(2, 4, 4, 4, seed=18)
    assert nst_loss(f, f).item() == pytest.approx(0.0, abs=1e-12)
    assert nst_loss(_rand(2, 3, 8, 8, seed=19), f).item() > 0


def test_nst_matches_spatial_gram_formulation():
    """mean k(s,s) + mean k(t,t) − 2 mean k(s,t) = mean_b ‖SᵀS/C_s − TᵀT/C_t‖²_F (HW×HW Grams)."""
    s, t = _rand(3, 5, 8, 8, seed=20), _rand(3, 7, 4, 4, seed=21)
    sp_ = F.normalize(F.avg_pool2d(s, 2).flatten(2), dim=2)  # B×C×N
    tp = F.normalize(t.flatten(2), dim=2)
    gram_s = sp_.transpose(1, 2) @ sp_ / sp_.shape[1]
    gram_t = tp.transpose(1, 2) @ tp / tp.shape[1]
    ref = ((gram_s - gram_t) ** 2).sum(dim=(1, 2)).mean()
    assert nst_loss(s, t).item() == pytest.approx(ref.item(), rel=1e-9)


# --- FitNet (§2.2, §9 item 10) --------------------------------------------------------------------


def test_fitnet_loss_value_and_shape_check():
    a, b = _rand(2, 3, 4, 4, seed=22), _rand(2, 3, 4, 4, seed=23)
    assert fitnet_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / a.numel(), rel=1e-12)
    with pytest.raises(ValueError, match="must equal"):
        fitnet_loss(a, b[:, :2])


# (student C, H), (teacher C, H), kind, parameter count: the §2.2 table
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


# --- methods through the Distiller ---------------------------------------------------------------


def _pair(num_classes: int = 10):
    torch.manual_seed(0)
    return create_model("cifar.resnet8", num_classes=num_classes), create_model("cifar.resnet14", num_classes=num_classes)


def _batch(n: int = 4, num_classes: int = 10, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(torch.randn(n, 3, size, size, generator=g), torch.randint(0, num_classes, (n,), generator=g))


def _features(model, keys, images):
    taps = {k: v for k, v in stage_taps(model).items() if k in keys}
    with FeatureRecorder(model, taps) as rec:
        logits = model(images)
    return logits, rec.features


@pytest.mark.parametrize("name", MY_METHODS)
def test_step_gradients_reach_student_and_method_never_teacher(name):
    student, teacher = _pair()
    method = build_method(name, student=student, teachers=[teacher], input_size=(3, 16, 16))
    distiller = Distiller(student, [teacher], method).train()
    running = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    _, losses = distiller.forward_train(_batch(size=16), StepInfo(epoch=25))
    assert set(losses) == {"ce", name}
    # the distillation term alone reaches the student (DKD through logits, the others through
    # features) and the method's own modules
    own = list(method.parameters())
    grads = torch.autograd.grad(losses[name], [student.conv1.weight, *own], retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in running.items())
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert all(id(p) in trainable for p in own)
    assert not any(id(p) in trainable for p in teacher.parameters())
    if name == "fitnet":
        assert len(own) == 4  # conv weight/bias, BN weight/bias


@pytest.mark.parametrize(
    ("name", "weight", "loss_fn"),
    [
        ("at", 1000.0, lambda s, t: sum(at_loss(s[k], t[k]) for k in ("stage1", "stage2", "stage3"))),
        ("nst", 50.0, lambda s, t: sum(nst_loss(s[k], t[k]) for k in ("stage1", "stage2", "stage3"))),
        ("sp", 3000.0, lambda s, t: sp_loss(s["stage3"], t["stage3"])),
        ("pkt", 30000.0, lambda s, t: pkt_loss(s["pooled"], t["pooled"])),
        ("rkd", 1.0, lambda s, t: rkd_loss(s["pooled"], t["pooled"])),
    ],
)
def test_method_applies_its_default_weight_to_the_right_features(name, weight, loss_fn):
    student, teacher = _pair()
    batch = _batch(size=16)
    keys = ["stage1", "stage2", "stage3", "pooled"]
    teacher.eval()
    with torch.no_grad():
        t_logits, t_feats = _features(teacher, keys, batch.images)
        s_logits, s_feats = _features(student, keys, batch.images)
        method = build_method(name, student=student, teachers=[teacher], input_size=(3, 16, 16))
        out = method(batch, ModelOutput(s_logits, s_feats), [ModelOutput(t_logits, t_feats)], StepInfo())
    assert out[name].item() == pytest.approx(weight * loss_fn(s_feats, t_feats).item(), rel=1e-5)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(s_logits, batch.targets).item(), rel=1e-6)


def test_method_feature_keys_follow_the_spec_table():
    student, teacher = _pair()
    keys = {n: build_method(n, student=student, teachers=[teacher]) for n in MY_METHODS}
    assert keys["dkd"].student_features == []
    assert keys["at"].student_features == ["stage1", "stage2", "stage3"]
    assert keys["nst"].teacher_features == ["stage1", "stage2", "stage3"]
    assert keys["sp"].student_features == ["stage3"]
    assert keys["fitnet"].student_features == ["stage2"]  # feat[2]: feat[0] is the stem
    assert keys["pkt"].student_features == keys["rkd"].teacher_features == ["pooled"]


def test_fitnet_method_loss_uses_regressed_stage2():
    student, teacher = _pair()
    batch = _batch(size=16)
    method = build_method("fitnet", student=student, teachers=[teacher], feat_weight=2.0, input_size=(3, 16, 16))
    teacher.eval()
    with torch.no_grad():
        t_logits, t_feats = _features(teacher, ["stage2"], batch.images)
        s_logits, s_feats = _features(student, ["stage2"], batch.images)
        out = method(batch, ModelOutput(s_logits, s_feats), [ModelOutput(t_logits, t_feats)], StepInfo())
        expected = 2.0 * F.mse_loss(method.regressor(s_feats["stage2"]), t_feats["stage2"])
    assert s_feats["stage2"].shape[1:] == (32, 8, 8)
    assert out["fitnet"].item() == pytest.approx(expected.item(), rel=1e-6)


# --- DKD warm-up (§2.8) ---------------------------------------------------------------------------


def test_dkd_warmup_factor_uses_one_indexed_epochs():
    student, teacher = _pair()
    method = build_method("dkd", student=student, teachers=[teacher])
    assert method.warmup_factor(StepInfo(epoch=0)) == pytest.approx(0.05)  # epoch 1
    assert method.warmup_factor(StepInfo(epoch=9)) == pytest.approx(0.5)  # epoch 10
    assert method.warmup_factor(StepInfo(epoch=19)) == 1.0  # epoch 20
    assert method.warmup_factor(StepInfo(epoch=100)) == 1.0
    assert build_method("dkd", student=student, teachers=[teacher], warmup_epochs=0).warmup_factor(StepInfo()) == 1.0

    batch = _batch()
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    full = dkd_loss(s, t, batch.targets, 1.0, 8.0, 4.0)
    for epoch, factor in [(0, 0.05), (19, 1.0)]:
        out = method(batch, ModelOutput(s), [ModelOutput(t)], StepInfo(epoch=epoch))
        assert out["dkd"].item() == pytest.approx(factor * full.item(), rel=1e-6)
        assert out["ce"].item() == pytest.approx(F.cross_entropy(s, batch.targets).item(), rel=1e-6)


# --- options ------------------------------------------------------------------------------------


def test_defaults_are_the_benchmark_hyper_parameters():
    """§2.12 and §2.8: γ = 1 everywhere and each method's β."""
    assert method_options("dkd") == {
        "ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20
    }
    expected = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "rkd": 1.0, "pkt": 30000.0, "nst": 50.0}
    for name, beta in expected.items():
        opts = method_options(name)
        assert opts["ce_weight"] == 1.0 and opts["feat_weight"] == beta, name
    assert method_options("at")["p"] == 2.0
    assert method_options("fitnet")["hint_layer"] == 2
    assert (method_options("rkd")["distance_weight"], method_options("rkd")["angle_weight"]) == (25.0, 50.0)


def test_build_method_rejects_bad_options():
    student, teacher = _pair()
    with pytest.raises(ConfigError, match="Did you mean 'beta'"):
        build_method("dkd", student=student, teachers=[teacher], betta=2.0)
    with pytest.raises(ConfigError, match="feat_weight"):
        build_method("at", student=student, teachers=[teacher], weight=2.0)
    bad = [
        ("dkd", {"temperature": 0.0}, "temperature"),
        ("dkd", {"warmup_epochs": -1}, "warmup_epochs"),
        ("dkd", {"beta": -1.0}, "beta"),
        ("at", {"p": 0.0}, "p must be"),
        ("sp", {"feat_weight": float("inf")}, "feat_weight"),
        ("rkd", {"angle_weight": -1.0}, "angle_weight"),
        ("fitnet", {"hint_layer": "2"}, "hint_layer"),
        ("fitnet", {"hint_layer": 5}, "stage5"),
    ]
    for name, options, message in bad:
        with pytest.raises(ConfigError, match=message):
            build_method(name, student=student, teachers=[teacher], **options)
    for name in MY_METHODS:
        with pytest.raises(ConfigError, match="exactly one teacher"):
            build_method(name, student=student, teachers=[teacher, teacher])


def test_stage_count_mismatch_is_a_clear_error():
    student, teacher = _pair()
    taps = {"stage1": "layer1", "stage2": "layer2", "stage3": "layer3", "stage4": "layer3.0"}
    for name in ("at", "nst"):
        with pytest.raises(ConfigError, match="pairs stages one to one"):
            build_method(name, student=student, teachers=[teacher], teacher_taps=taps)


# --- recipes (§4, §5) ---------------------------------------------------------------------------

SAME_ARCH = ["wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1", "resnet56-resnet20", "resnet110-resnet20",
             "resnet110-resnet32", "resnet32x4-resnet8x4", "vgg13-vgg8"]
CROSS_ARCH = ["vgg13-mobile_half", "resnet50-mobile_half", "resnet50-vgg8", "resnet32x4-shufflev1",
              "resnet32x4-shufflev2", "wrn_40_2-shufflev1"]
SPOT_CHECKS = {  # (method, pair): (published top-1, DKD β or None)
    ("fitnet", "resnet32x4-resnet8x4"): (73.50, None),
    ("at", "vgg13-mobile_half"): (59.40, None),
    ("sp", "resnet50-mobile_half"): (68.08, None),
    ("rkd", "wrn_40_2-shufflev1"): (72.21, None),
    ("pkt", "resnet110-resnet32"): (72.61, None),
    ("nst", "resnet50-vgg8"): (71.28, None),
    ("dkd", "resnet56-resnet20"): (71.97, 2.0),
    ("dkd", "vgg13-mobile_half"): (69.71, 6.0),
    ("dkd", "resnet32x4-shufflev2"): (77.07, 8.0),
}


def test_recipes_cover_the_benchmark_tables():
    for name in MY_METHODS:
        present = {p.stem for p in (RECIPES / name).glob("*.yaml")}
        expected = set(SAME_ARCH + CROSS_ARCH)
        if name == "dkd":  # no published DKD number for these two pairs
            expected -= {"resnet110-resnet20", "resnet50-vgg8"}
        assert present == expected, name


def test_recipes_are_valid_and_carry_the_spec_numbers():
    for path in sorted(RECIPES.glob("*/*.yaml")):
        if path.parent.name not in MY_METHODS:
            continue
        raw = load_recipe(path)
        assert raw["method"]["name"] == path.parent.name
        assert set(raw["method"]["options"]) <= set(method_options(path.parent.name)), path
        teacher, student = path.stem.split("-")
        assert raw["student"]["model"] == f"cifar.{student}"
        assert raw["teachers"][0]["model"] == f"cifar.{teacher}"
        lr = 0.01 if student in ("mobile_half", "shufflev1", "shufflev2") else 0.05
        assert raw["optim"]["lr"] == lr and raw["optim"]["weight_decay"] == 5e-4, path
        assert raw["trainer"]["max_epochs"] == 240 and raw["data"]["batch_size"] == 64
        assert 50 < raw["published"]["top1"] < 80
    for (method, pair), (top1, beta) in SPOT_CHECKS.items():
        raw = load_recipe(RECIPES / method / f"{pair}.yaml")
        assert raw["published"]["top1"] == top1
        if beta is not None:
            assert raw["method"]["options"]["beta"] == beta


def test_recipes_pass_the_config_loader():
    config = pytest.importorskip("kdistill.config")
    for name in MY_METHODS:
        for path in sorted((RECIPES / name).glob("*.yaml")):
            cfg = config.build_config(str(path))
            assert cfg.method.name == name
