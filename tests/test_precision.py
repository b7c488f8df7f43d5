"""Mixed precision for the whole step: the losses run in float32 by design, classifiers in float32,
the teachers follow the trainer's precision, and a bf16 step matches the float32 step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_compile import make

from kdistill.engine.precision import float32_classifier, resolve_teacher_precision
from kdistill.losses import (
    at_loss,
    crd_nce_loss,
    discriminator_loss,
    dkd_loss,
    fitnet_loss,
    fooling_loss,
    hcl_loss,
    kd_loss,
    nst_loss,
    pkt_loss,
    rkd_loss,
    similarity_loss,
    soft_cross_entropy,
    sp_loss,
)
from kdistill.losses.crd import Embed
from kdistill.methods.base import Batch, StepInfo
from kdistill.utils import ConfigError

g = torch.Generator().manual_seed(0)
LOGITS_S, LOGITS_T = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
TARGET = torch.randint(0, 10, (8,), generator=g)
MAP_S, MAP_T = torch.randn(8, 6, 4, 4, generator=g), torch.randn(8, 6, 4, 4, generator=g)
VEC_S, VEC_T = torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g)
PROBS = torch.rand(8, 5, generator=g) * 1e-3

LOSSES = {
    "kd": lambda: kd_loss(LOGITS_S, LOGITS_T, 4.0),
    "dkd": lambda: dkd_loss(LOGITS_S, LOGITS_T, TARGET, 1.0, 8.0, 4.0),
    "hcl": lambda: hcl_loss([MAP_S], [MAP_T]),
    "at": lambda: at_loss(MAP_S, MAP_T),
    "fitnet": lambda: fitnet_loss(MAP_S, MAP_T),
    "nst": lambda: nst_loss(MAP_S, MAP_T),
    "sp": lambda: sp_loss(MAP_S, MAP_T),
    "pkt": lambda: pkt_loss(VEC_S, VEC_T),
    "rkd": lambda: rkd_loss(VEC_S, VEC_T),
    "crd_nce": lambda: crd_nce_loss(PROBS, 100),
    "soft_ce": lambda: soft_cross_entropy(LOGITS_S, F.softmax(LOGITS_T, 1), 4.0),
    "similarity": lambda: similarity_loss(LOGITS_S, F.softmax(LOGITS_T, 1)),
    "discriminator": lambda: discriminator_loss(VEC_S[:, :2], VEC_T[:, :2]),
    "fooling": lambda: fooling_loss(VEC_S[:, :2]),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_runs_in_float32_under_autocast(name):
    """Under bf16 autocast each loss gives bit for bit its float32 value (matrix products, softmax at
    temperature, log-sum-exps and poolings would otherwise run in bf16)."""
    plain = LOSSES[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = LOSSES[name]()
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain), (mixed.item(), plain.item())


def test_crd_embedding_normalises_in_float32():
    embed = Embed(12, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = embed(VEC_S)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(8), rtol=0, atol=1e-6)


def test_float32_classifier_is_exact_without_autocast_and_float32_under_it():
    d = make("kd")
    x = torch.randn(3, 3, 8, 8)
    before = d.student(x)
    float32_classifier(d.student)
    assert torch.equal(d.student(x), before)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert d.student(x).dtype == torch.float32
    float32_classifier(d.student, enabled=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert d.student(x).dtype == torch.bfloat16


def test_teacher_precision_follows_the_trainer():
    assert resolve_teacher_precision("auto", "bf16-mixed") == "bf16"
    assert resolve_teacher_precision("auto", "16-mixed", "gpu") == "16"
    assert resolve_teacher_precision("auto", "16-mixed", "cpu") == "bf16"  # Lightning's choice on a CPU
    assert resolve_teacher_precision("auto", "32-true") == "32"
    assert resolve_teacher_precision("32", "bf16-mixed") == "32"
    with pytest.raises(ConfigError, match="teacher.precision"):
        resolve_teacher_precision("fp8", "32-true")


# measured on these tiny networks: at most 4e-4 relative (bf16 keeps 8 mantissa bits, 2^-8 = 0.4%)
STEP_TOLERANCE = 1e-2


@pytest.mark.parametrize("method,options", [
    ("kd", {}), ("dkd", {"warmup_epochs": 0}), ("reviewkd", {"warmup_epochs": 0}),
    ("crd", {"num_samples": 16, "num_negatives": 8, "feat_dim": 8}), ("meal_v2", {"disc_reduction": 1}),
])
def test_bf16_step_matches_the_float32_step(method, options):
    """The whole step under bf16 autocast (as ``trainer.precision=bf16-mixed`` runs it: teachers,
    student, the method's modules) gives every loss term within ``STEP_TOLERANCE`` of float32, as
    float32 tensors, and float32 logits."""
    mixed = make(method, **options)
    plain = copy.deepcopy(mixed)
    mixed.configure_teachers("bf16")
    float32_classifier(mixed.student)
    gen = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen), torch.arange(16))
    torch.manual_seed(2)  # CRD draws its negatives
    _, ref = plain.forward_train(batch, StepInfo())
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, got = mixed.forward_train(batch, StepInfo())
    assert logits.dtype == torch.float32
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == torch.float32, k
        assert got[k].item() == pytest.approx(ref[k].item(), rel=STEP_TOLERANCE), k
        assert not torch.equal(got[k], ref[k]) or k == "ce", f"{k}: the bf16 step ran in float32"


def test_channels_last_end_to_end_equals_the_default_format():
    """``trainer.channels_last``: student, ReviewKD's ABFs and the teacher in channels-last format, the
    student's input converted; the losses equal the default format's within float rounding."""
    cl = make("reviewkd", warmup_epochs=0)
    plain = copy.deepcopy(cl)
    cl.configure_teachers("32", channels_last=True)
    cl.configure_student(channels_last=True)
    convs = [m for m in (*cl.student.modules(), *cl.method.modules(), *cl.teachers.modules())
             if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert any(c in set(cl.method.modules()) for c in convs)  # the ABFs' 3×3 convolutions are among them
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = []
    hook = cl.student.conv1.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    batch = Batch(torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,)), torch.arange(6))
    _, got = cl.forward_train(batch, StepInfo())
    _, ref = plain.forward_train(batch, StepInfo())
    hook.remove()
    assert seen == [True]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


class _OwnOnly(torch.nn.Module):
    """The own-optimizer side of a method: one parameter trained by its own SGD (lr 0.5)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def own_parameters(self):
        return [self.w]

    def configure_own_optimizer(self):
        return torch.optim.SGD([self.w], lr=0.5)

    def own_lr(self, main_lr, main_base_lr):
        return None


def test_own_optimizer_joint_step_unscales_float16_loss_scaling_and_skips_infinite_gradients():
    from kdistill.step import OwnOptimizerStep

    m = _OwnOnly()
    own = OwnOptimizerStep(m)
    m.w.grad = torch.tensor([3.0, 1.0]) * 1024.0  # the main loss was multiplied by 1024 before its backward
    own.after_main_backward(main_loss_scale=1024.0)
    torch.testing.assert_close(m.w.detach(), torch.tensor([1.0 - 0.5 * 3.0, -2.0 - 0.5 * 1.0]))
    before = m.w.detach().clone()
    m.w.grad = torch.tensor([float("inf"), 1.0])  # overflow: the scaler skips the main step, and so do we
    own.after_main_backward(main_loss_scale=1024.0)
    assert torch.equal(m.w.detach(), before) and m.w.grad is None


def test_own_optimizer_separate_step_with_a_loss_scaler_equals_the_plain_step():
    from kdistill.step import OwnOptimizerStep

    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        m = _OwnOnly()
        own = OwnOptimizerStep(m, scaler)
        own.separate_step({"d": (m.w ** 2).sum()})  # gradient 2w
        results.append(m.w.detach().clone())
        assert "grad_scaler" in own.state_dict() if scaler is not None else "grad_scaler" not in own.state_dict()
    torch.testing.assert_close(results[1], results[0])
    torch.testing.assert_close(results[0], torch.tensor([1.0 - 0.5 * 2.0, -2.0 - 0.5 * -4.0]))
