"""MEAL v1 / MEAL V2 (docs/methods/meal.md): losses by hand, discriminator sizes, teacher selection,
adversarial modes, the own-optimizer protocol, state round trips, frozen teachers, validation."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from kdistill import create_model
from kdistill.config import build_config
from kdistill.losses import discriminator_loss, fooling_loss, meal_align, similarity_loss, soft_cross_entropy
from kdistill.methods import Batch, ModelOutput, StepInfo, build_method, method_options
from kdistill.methods.adversarial import grad_reverse
from kdistill.methods.discriminator import Discriminator, discriminator_widths
from kdistill.step import Distiller, OwnOptimizerStep, train_step
from kdistill.utils import ConfigError

SIZE = (3, 8, 8)
LN2 = math.log(2.0)


def model(name: str = "cifar.resnet8", classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=classes)


def make_batch(n: int = 4, seed: int = 0, classes: int = 10) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, *SIZE, generator=g), torch.randint(0, classes, (n,), generator=g))


def meal(student, teachers, name: str = "meal_v1", **options):
    return build_method(name, student=student, teachers=teachers, input_size=SIZE, **options)


def sp(a: float) -> float:
    return math.log1p(math.exp(a))


# --- losses by hand ------------------------------------------------------------------------------


def test_align_worked_examples():
    x = torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2)
    assert meal_align(x, 8).tolist() == [[1, 1, 2, 2, 3, 3, 4, 4]]
    assert torch.allclose(meal_align(x, 3), torch.tensor([[1.5, 2.5, 3.5]]))
    assert meal_align(x, 3, pool="max").tolist() == [[2, 3, 4]]
    two = torch.tensor([[1.0, 2, 3, 4], [3, 4, 5, 6]]).view(1, 2, 2, 2)
    assert torch.allclose(meal_align(two, 2), torch.tensor([[2.5, 4.5]]))  # channel mean of [1.5,3.5], [3.5,5.5]
    assert meal_align(two, 2, pool="max").tolist() == [[4, 6]]  # channel max of [2,4], [4,6]
    const = torch.full((3, 5, 4, 4), 7.0)
    out = meal_align(const, 37)
    assert out.shape == (3, 37) and torch.all(out == 7.0)
    assert meal_align(torch.randn(1, 4, 8, 8), 10).shape == (1, 10)  # B=1 keeps the batch axis


def test_similarity_losses_by_hand():
    s = torch.tensor([[0.0, math.log(3.0)]])  # softmax [0.25, 0.75]
    p = torch.tensor([[0.5, 0.5]])
    ce = 0.5 * (math.log(4) + math.log(4 / 3))
    assert similarity_loss(s, p, "soft_ce").item() == pytest.approx(ce, abs=1e-6)
    assert soft_cross_entropy(s, p).item() == pytest.approx(ce, abs=1e-6)
    assert similarity_loss(s, p, "kl").item() == pytest.approx(ce - LN2, abs=1e-6)
    assert similarity_loss(s, p, "l1_prob").item() == pytest.approx(0.25, abs=1e-6)
    assert similarity_loss(s, p, "l2_prob").item() == pytest.approx(0.0625, abs=1e-6)
    raw_s, raw_t = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 4.0]])
    assert similarity_loss(raw_s, raw_t, "l1").item() == pytest.approx(1.5)
    assert similarity_loss(raw_s, raw_t, "l2").item() == pytest.approx(2.5)
    # temperature divides the student logits: [0, 2 ln 3] at T=2 is [0, ln 3] at T=1
    assert similarity_loss(2 * s, p, "soft_ce", temperature=2.0).item() == pytest.approx(ce, abs=1e-6)
    # equal logits over C classes: ln C
    z = torch.randn(3, 1).expand(3, 10)
    assert similarity_loss(z, F.softmax(z, 1), "soft_ce").item() == pytest.approx(math.log(10), abs=1e-5)
    with pytest.raises(ValueError, match="allowed"):
        similarity_loss(s, p, "cosine")


def test_discriminator_bce_by_hand():
    assert discriminator_loss(torch.zeros(3, 2), torch.zeros(3, 2)).item() == pytest.approx(LN2, abs=1e-6)
    assert discriminator_loss(torch.zeros(3, 1), torch.zeros(3, 1)).item() == pytest.approx(LN2, abs=1e-6)
    a, b, c, d = 0.3, -1.2, 2.0, 0.5
    expected = (sp(-a) + sp(b) + sp(c) + sp(-d)) / 4  # the discriminator loss, B=1
    got = discriminator_loss(torch.tensor([[a, b]]), torch.tensor([[c, d]])).item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert fooling_loss(torch.tensor([[a, b]])).item() == pytest.approx((sp(a) + sp(-b)) / 2, abs=1e-6)


def test_final_relu_floor():
    # identity hidden layers; last layer maps [x0, x1] -> [x0 - x1, x1 - x0]
    rows_s, rows_t = torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]])
    for final_relu, expected in ((True, LN2 / 2), (False, 0.0)):
        disc = Discriminator(2, reduction=1, depth=2, final_relu=final_relu)
        linears = [m for m in disc.layers if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for lin in linears:
                lin.bias.zero_()
                lin.weight.copy_(torch.eye(2))
            linears[-1].weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
        loss = discriminator_loss(disc(rows_s), disc(rows_t)).item()
        assert loss == pytest.approx(expected, abs=1e-6)


def test_grad_reverse():
    x = torch.randn(4, requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert torch.equal(x.grad, torch.full((4,), -0.5))


# --- discriminator sizes (the authors' discriminators) ------------------------------------------


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_discriminator_widths_and_params():
    assert discriminator_widths(10, 2) == [10, 5, 2, 2]
    assert discriminator_widths(500, 2) == [500, 250, 125, 2]
    assert discriminator_widths(1000, 8) == [1000, 125, 15, 2]
    assert n_params(Discriminator(10, 2)) == 73
    assert n_params(Discriminator(500, 2)) == 156_877
    assert n_params(Discriminator(1000, 8)) == 127_047
    linears = [m for m in Discriminator(1000, 8).layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1000, 125), (125, 15), (15, 2)]
    with torch.device("meta"):
        assert n_params(Discriminator(10000, 2)) == 62_512_502
        assert sum(n_params(Discriminator(d, 2)) for d in (10000, 5000, 1000, 500, 10)) == 78_926_956
    with pytest.raises(ConfigError, match="disc_reduction"):
        discriminator_widths(10, 8)  # 10 -> 1 -> 0


def test_method_builds_spec_discriminators():
    m = meal(model(classes=100), [model(classes=100)], name="meal_v2")
    assert [d.widths for d in m.discriminators] == [[100, 12, 1, 2]]
    m = meal(model(), [model()], blocks=["stage2", "stage3", "logits"], dims=[500, 1000, None])
    assert [d.widths for d in m.discriminators] == [[500, 250, 125, 2], [1000, 500, 250, 2], [10, 5, 2, 2]]
    assert m.dims == [500, 1000, 10]
    with pytest.raises(ConfigError, match="disc_reduction"):
        meal(model(), [model()], name="meal_v2")  # 10 classes with K=8 collapse


# --- teacher selection -------------------------------------------------------------------------


def count_calls(teachers):
    calls = [0] * len(teachers)
    for i, t in enumerate(teachers):
        t.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def test_random_selection_runs_one_teacher_and_is_uniform():
    teachers = [model(seed=s) for s in range(3)]
    method = meal(model(), teachers, teacher_selection="random", seed=1)
    distiller = Distiller(model(), teachers, method)
    calls = count_calls(teachers)
    batch = make_batch()
    for step in range(6):
        before = list(calls)
        distiller.forward_train(batch, StepInfo(step=step))
        ran = [i for i in range(3) if calls[i] != before[i]]
        assert len(ran) == 1 and calls[ran[0]] == before[ran[0]] + 1
        assert ran == method._selected
    draws = torch.tensor([method.select_teachers(StepInfo())[0] for _ in range(3000)])
    freq = torch.bincount(draws, minlength=3)
    assert ((freq - 1000).abs() < 100).all(), freq  # σ ≈ 26
    assert method.selection_counts.sum() == 3006


def test_weighted_and_average_selection():
    teachers = [model(seed=s) for s in range(3)]
    weighted = meal(model(), teachers, teacher_selection="weighted", teacher_weights=[1, 2, 2])
    draws = torch.tensor([weighted.select_teachers(StepInfo())[0] for _ in range(4000)])
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.2, 0.4, 0.4]), atol=0.035), freq
    average = meal(model(), teachers, teacher_selection="average")
    distiller = Distiller(model(), teachers, average)
    calls = count_calls(teachers)
    distiller.forward_train(make_batch(), StepInfo())
    assert calls == [1, 1, 1]


def two_class_outputs():
    return [ModelOutput(torch.tensor([[0.0, 0.0]])), ModelOutput(torch.tensor([[math.log(3.0), 0.0]]))]


def test_average_targets_equal_hand_means():
    teachers = [model(classes=2, seed=s) for s in range(2)]
    student = ModelOutput(torch.tensor([[1.0, 0.0]]))
    m = meal(model(classes=2), teachers, teacher_selection="average", disc_reduction=1)
    (vec,) = m.block_vectors(student, two_class_outputs())
    assert torch.allclose(vec.target, torch.tensor([[0.625, 0.375]]))  # mean of [.5,.5] and [.75,.25]
    assert torch.allclose(vec.disc_teacher, torch.tensor([[math.log(3.0) / 2, 0.0]]))  # mean logits for D
    assert torch.equal(vec.disc_student, student.logits)
    losses = m(make_batch(1, classes=2), student, two_class_outputs(), StepInfo())
    assert losses["sim_logits"].item() == pytest.approx(math.log1p(math.e) - 0.625, abs=1e-6)

    m = meal(model(classes=2), teachers, teacher_selection="mean_logits", disc_reduction=1)
    (vec,) = m.block_vectors(student, two_class_outputs())
    assert torch.allclose(vec.target, torch.tensor([[0.6340, 0.3660]]), atol=1e-4)

    m = meal(model(classes=2), teachers, teacher_selection="average", teacher_weights=[1, 3], disc_reduction=1,
             disc_teacher_input="mean_probs")
    (vec,) = m.block_vectors(student, two_class_outputs())
    assert torch.allclose(vec.target, torch.tensor([[0.6875, 0.3125]]))
    assert torch.allclose(vec.disc_teacher, vec.target)
    assert torch.allclose(vec.disc_student, F.softmax(student.logits, 1))


def test_feature_block_average_uses_aligned_vectors():
    teachers = [model(classes=2, seed=s) for s in range(2)]
    m = meal(model(classes=2), teachers, teacher_selection="average", blocks=["stage3"], dims=[3],
             similarity="l2", disc_reduction=1)
    feats = [torch.tensor([1.0, 2, 3, 4]).view(1, 1, 2, 2), torch.tensor([3.0, 4, 5, 6]).view(1, 1, 2, 2)]
    outs = [ModelOutput(torch.zeros(1, 2), {"stage3": f}) for f in feats]
    student = ModelOutput(torch.zeros(1, 2), {"stage3": torch.zeros(1, 1, 2, 2)})
    (vec,) = m.block_vectors(student, outs)
    assert torch.allclose(vec.target, torch.tensor([[2.5, 3.5, 4.5]]))  # mean of [1.5,2.5,3.5], [3.5,4.5,5.5]
    loss = m(make_batch(1, classes=2), student, outs, StepInfo())["sim_stage3"]
    assert loss.item() == pytest.approx((2.5**2 + 3.5**2 + 4.5**2) / 3, abs=1e-5)


# --- adversarial modes and the own-optimizer protocol -------------------------------------------


def build(mode: str, torch_seed: int = 0, **options):
    teachers = [model(seed=10), model("cifar.resnet14", seed=11)]
    student = model(seed=torch_seed)
    torch.manual_seed(torch_seed)
    method = meal(student, teachers, adversarial_mode=mode, **options)
    return Distiller(student, teachers, method)


def test_grl_reverses_the_student_gradient_of_the_adversarial_term():
    options = dict(blocks=["stage3", "logits"], dims=[32, None], sim_weights=[0.0, 0.0], teacher_selection="average")
    coop = build("cooperative", **options)
    grl = build("grl", **options)
    grl.load_state_dict(coop.state_dict())
    batch = make_batch()
    grads = {}
    for name, d in (("coop", coop), ("grl", grl)):
        _, losses = d.forward_train(batch, StepInfo())
        assert set(losses) == {"adv_stage3", "adv_logits"}
        sum(losses.values()).backward()
        grads[name] = (
            torch.cat([p.grad.flatten() for p in d.student.parameters()]),
            torch.cat([p.grad.flatten() for p in d.method.own_parameters()]),
        )
    s_coop, d_coop = grads["coop"]
    s_grl, d_grl = grads["grl"]
    assert s_coop.abs().max() > 0
    assert torch.allclose(s_grl, -s_coop, atol=1e-6)
    assert torch.allclose(d_grl, d_coop, atol=1e-7)


def test_cooperative_student_step_makes_discrimination_easier():
    """At fixed D: a small step of v_S along -∂L_D decreases L_D, along the GRL gradient increases it."""
    torch.manual_seed(0)
    disc = Discriminator(10, 2)
    v_s, v_t = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    for reverse, sign in ((False, -1), (True, 1)):
        rows = grad_reverse(v_s, 1.0) if reverse else v_s
        loss = discriminator_loss(disc(rows), disc(v_t))
        (g,) = torch.autograd.grad(loss, v_s)
        with torch.no_grad():
            moved = discriminator_loss(disc(v_s - 1e-2 * g), disc(v_t))
        assert sign * (moved - loss) > 0


def params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_alternating_updates_discriminators_and_student_in_separate_steps():
    d = build("alternating", blocks=["stage3", "logits"], dims=[32, None])
    main = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    own = OwnOptimizerStep(d.method)
    seen = {}
    separate = own.separate_step

    def spy(losses):
        seen["student0"], seen["disc0"] = params(d.student), params(d.method.discriminators)
        seen["own_losses"] = sorted(losses)
        separate(losses)
        seen["student1"], seen["disc1"] = params(d.student), params(d.method.discriminators)

    own.separate_step = spy
    losses = train_step(d, make_batch(), StepInfo(), main, own)
    assert seen["own_losses"] == ["disc_logits", "disc_stage3"]
    assert same(seen["student0"], seen["student1"])  # discriminator step: student untouched
    assert not same(seen["disc0"], seen["disc1"])
    assert same(seen["disc1"], params(d.method.discriminators))  # student step: discriminators untouched
    assert not same(seen["student1"], params(d.student))
    assert {"adv_stage3", "adv_logits", "sim_stage3", "sim_logits"} <= set(losses)
    assert all(p.grad is None for p in d.method.own_parameters())


def test_cooperative_steps_both_in_one_step_with_own_lr():
    d = build("cooperative", d_lr=0.05, d_lr_schedule="scaled")
    main = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(main, lambda step: 0.1)  # main lr 0.01, initial 0.1
    own = OwnOptimizerStep(d.method)
    s0, d0 = params(d.student), params(d.method.discriminators)
    train_step(d, make_batch(), StepInfo(), main, own)
    assert not same(s0, params(d.student)) and not same(d0, params(d.method.discriminators))
    assert own.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert sched.get_last_lr() == [pytest.approx(0.01)]
    assert all(p.grad is None for p in d.method.own_parameters())


def test_own_lr_schedules():
    d = build("cooperative", d_lr=0.05)
    m = d.method
    assert m.own_lr(0.01, 0.1) == pytest.approx(0.005)
    m.d_lr_schedule = "constant"
    assert m.own_lr(0.01, 0.1) == pytest.approx(0.05)
    m.d_lr_schedule = "student"
    assert m.own_lr(0.01, 0.1) == pytest.approx(0.01)


def test_own_parameters_are_exactly_the_discriminators_and_excluded_from_main():
    teachers = [model("cifar.resnet8x4", seed=3)]  # stage3 width 256 vs the student's 64
    student = model()
    m = meal(student, teachers, blocks=["stage3", "logits"], align="gap_linear")
    d = Distiller(student, teachers, m)
    own = {id(p) for p in m.own_parameters()}
    assert own == {id(p) for p in m.discriminators.parameters()}
    assert m.dims == [256, 10]
    align = m.align_layers[0]
    assert isinstance(align, torch.nn.Linear) and (align.in_features, align.out_features) == (64, 256)
    trainable = {id(p) for p in d.trainable_parameters()}
    assert not own & trainable
    assert {id(p) for p in align.parameters()} <= trainable
    assert {id(p) for p in m.parameters()} == own | {id(p) for p in align.parameters()}
    assert meal(student, teachers, adversarial_mode="off").configure_own_optimizer() is None


def test_state_round_trip():
    a = build("cooperative", torch_seed=0, seed=0)
    for _ in range(7):
        a.method.select_teachers(StepInfo())
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert any(k.startswith("method.discriminators.0.") for k in state)
    b = build("cooperative", torch_seed=5, seed=99)
    assert not same(params(a.method.discriminators), params(b.method.discriminators))
    b.load_state_dict(state)
    assert same(params(a.method.discriminators), params(b.method.discriminators))
    assert torch.equal(a.method.selection_counts, b.method.selection_counts)
    assert a.method._selected == b.method._selected
    draws_a = [a.method.select_teachers(StepInfo())[0] for _ in range(20)]
    draws_b = [b.method.select_teachers(StepInfo())[0] for _ in range(20)]
    assert draws_a == draws_b and len(set(draws_a)) == 2


def test_teachers_never_get_gradients():
    for mode in ("cooperative", "grl", "alternating"):
        d = build(mode, blocks=["stage2", "logits"], dims=[16, None], teacher_selection="average")
        before = [copy.deepcopy(t.state_dict()) for t in d.teachers]
        main = torch.optim.SGD(d.trainable_parameters(), lr=0.1)
        own = OwnOptimizerStep(d.method)
        train_step(d, make_batch(), StepInfo(), main, own)
        for t, sd in zip(d.teachers, before, strict=True):
            assert all(p.grad is None and not p.requires_grad for p in t.parameters())
            assert all(torch.equal(v, sd[k]) for k, v in t.state_dict().items())  # incl. BN running stats


def test_labels_unused_unless_weighted():
    d = build("cooperative", teacher_selection="average")
    batch = make_batch()
    shuffled = Batch(batch.images, batch.targets.roll(1), batch.index)
    _, l1 = d.forward_train(batch, StepInfo())
    _, l2 = d.forward_train(shuffled, StepInfo())
    assert l1.keys() == l2.keys() == {"sim_logits", "adv_logits"}
    assert all(torch.allclose(l1[k], l2[k]) for k in l1)
    d.method.hard_label_weight = 0.5
    _, l3 = d.forward_train(batch, StepInfo())
    assert l3["ce"].item() == pytest.approx(0.5 * F.cross_entropy(d.student(batch.images), batch.targets).item(), rel=1e-4)


# --- presets, validation, recipes --------------------------------------------------------------


def test_presets():
    v1, v2 = method_options("meal_v1"), method_options("meal_v2")
    assert (v1["teacher_selection"], v1["disc_reduction"], v1["d_lr"], v1["adversarial_mode"]) == ("random", 2, 1e-3, "cooperative")
    assert (v2["teacher_selection"], v2["disc_reduction"], v2["d_weight_decay"]) == ("average", 8, 0.0)
    assert v1["final_relu"] is False and v2["final_relu"] is False and v2["blocks"] == ("logits",)
    assert v1["hard_label_weight"] == 0.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"blocks": ["logits"], "sim_weights": [1.0, 1.0]}, "one per block"),
        ({"blocks": ["stage3", "logits"]}, "dims for block 'stage3'"),
        ({"blocks": ["logits"], "dims": [100]}, "number of classes 10"),
        ({"adversarial_mode": "minmax"}, "Allowed"),
        ({"teacher_selection": "weighted"}, "needs teacher_weights"),
        ({"teacher_weights": [1.0, 1.0]}, "not used by teacher_selection='random'"),
        ({"teacher_selection": "average", "teacher_weights": [1.0]}, "teacher_weights must be 2"),
        ({"blocks": ["stage7"], "dims": [8]}, "stage7"),
        ({"blocks": ["stage3"], "align": "gap_linear"}, "different widths"),
        ({"similarity": "cos"}, "similarity"),
        ({"grl_lambda": -1.0}, "grl_lambda"),
        ({"colour": 1}, "colour"),
    ],
)
def test_validation_errors(options, message):
    teachers = [model(seed=1), model("cifar.resnet8x4", seed=2)]
    with pytest.raises(ConfigError, match=message):
        meal(model(), teachers, **options)


def test_teacher_class_mismatch():
    with pytest.raises(ConfigError, match="teacher 0 outputs 100 classes"):
        meal(model(), [model(classes=100)])


def test_recipes_validate():
    v1 = build_config("cifar10/meal_v1/vgg19-vgg19")
    assert v1.method.name == "meal_v1" and v1.method.options["dims"][-1] == 10
    ens = build_config("cifar10/meal_v1/ensemble-resnet56")
    assert len(ens.teachers) == 5 and ens.method.options["blocks"] == ["logits"]
    v2 = build_config("imagenet/meal_v2/resnet50")
    assert v2.method.name == "meal_v2" and v2.published["top1"] == 80.67 and v2.optim.weight_decay == 0.0
    assert all("." in t.model.removeprefix("timm.") for t in v2.teachers)  # fully tagged timm names


def test_each_teacher_of_a_pool_has_its_own_taps() -> None:
    """A ResNet and a wide ResNet name their last stage differently (layer3 / block3): each teacher
    gets its own tap override, the block is probed on the right module, and a wrong name fails."""
    student = create_model("cifar.resnet8", num_classes=10)
    resnet = create_model("cifar.resnet20", num_classes=10)
    wrn = create_model("cifar.wrn_16_1", num_classes=10)
    m = build_method("meal_v1", student=student, teachers=[resnet, wrn], blocks=["last", "logits"], align="gap_linear",
                     student_taps={"last": "layer3"}, teacher_taps=[{"last": "layer3"}, {"last": "block3"}])
    assert m.teacher_taps(0)["last"] == "layer3" and m.teacher_taps(1)["last"] == "block3"
    # the same dict for every teacher still works, and names a module the wide ResNet lacks
    with pytest.raises(ConfigError, match="layer3"):
        build_method("meal_v1", student=student, teachers=[resnet, wrn], blocks=["last", "logits"], align="gap_linear",
                     student_taps={"last": "layer3"}, teacher_taps={"last": "layer3"})
    with pytest.raises(ConfigError, match="teacher_taps lists 1 entries for 2 teachers"):
        build_method("meal_v1", student=student, teachers=[resnet, wrn], teacher_taps=[{"last": "layer3"}])
    d = Distiller(student, [resnet, wrn], m)
    x = torch.randn(2, 3, 32, 32)
    assert d.teacher_forward(0, x).features["last"].shape == (2, 64, 8, 8)  # resnet20's layer3
    assert d.teacher_forward(1, x).features["last"].shape == (2, 64, 8, 8)  # wrn_16_1's block3
    assert torch.equal(d.teacher_forward(1, x).features["last"], wrn.block3(wrn.block2(wrn.block1(wrn.conv1(x)))))


def test_build_run_passes_each_teachers_taps(tmp_path) -> None:
    from kdistill.engine.build import build_run

    cfg = build_config(None, [
        "data.name=synthetic", "data.num_classes=5", "data.train_size=20", "data.val_size=10", "data.image_size=16",
        "model=cifar.resnet8", "student.taps={last: layer3}",
        "teachers.0.model=cifar.resnet8", "teachers.0.taps={last: layer3}",
        "teachers.1.model=cifar.wrn_16_1", "teachers.1.taps={last: block3}",
        "method.name=meal_v1", "method.options.blocks=[last, logits]", "method.options.align=gap_linear", f"output={tmp_path}", "teacher.allow_untrained=true",
    ])
    built = build_run(cfg)
    method = built.distiller.method
    assert [method.teacher_taps(i)["last"] for i in range(2)] == ["layer3", "block3"]
    assert [taps["last"] for taps in built.distiller.teacher_taps] == ["layer3", "block3"]
