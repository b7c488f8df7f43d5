"""The online methods (dml, oekd, mcl, mcl_okd, ffsd) and hkd on the method interface: what each
optimizer group trains, where every loss term's gradient goes, memory updates, configuration errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import mutual_kl
from kdistill.methods import Batch, RunFacts, StepInfo, build_method
from kdistill.models import create_model
from kdistill.optim import GroupedOptimizer, make_optimizer
from kdistill.step import Distiller
from kdistill.utils import ConfigError

SIZE = (3, 16, 16)


def _batch(n: int = 8, classes: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(n, *SIZE, generator=g), torch.arange(n) % classes, torch.arange(n))


def _distiller(method: str, model: str, teachers: tuple = (), num_samples: int = 32, **kwargs) -> Distiller:
    torch.manual_seed(0)
    student = create_model(model, num_classes=4, **kwargs.pop("model_kwargs", {}))
    facts = RunFacts(input_size=SIZE, num_samples=num_samples, num_classes=4,
                     train_targets=torch.arange(num_samples) % 4)
    m = build_method(method, student=student, teachers=list(teachers), facts=facts, **kwargs)
    return Distiller(student, list(teachers), m)


def _grads_by_group(distiller: Distiller, loss: torch.Tensor) -> dict[str, bool]:
    """Which optimizer groups receive a non-zero gradient from ``loss``."""
    groups = distiller.method.param_groups()
    for p in distiller.parameters():
        p.grad = None
    loss.backward(retain_graph=True)
    return {g.name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in g.params) for g in groups}


def test_dml_each_network_gets_exactly_its_own_objective_gradient() -> None:
    d = _distiller("dml", "online.peers", model_kwargs={"networks": ["cifar.resnet8"] * 3}, temperature=2.0)
    batch = _batch()
    _, losses = d.forward_train(batch, StepInfo())
    total = sum(losses.values())
    cohort = d.student
    for p in cohort.parameters():
        p.grad = None
    total.backward()
    got = [p.grad.clone() for p in cohort.members[1].parameters()]
    # network 1's own objective, computed separately: CE + mean KL from the detached peers
    for p in cohort.parameters():
        p.grad = None
    logits = cohort.forward_all(batch.images)
    own = F.cross_entropy(logits[1], batch.targets) + mutual_kl(logits, 2.0)[1]
    own.backward()
    for a, p in zip(got, cohort.members[1].parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_dml_groups_are_the_networks_and_each_optimizer_moves_only_its_own() -> None:
    d = _distiller("dml", "online.peers", model_kwargs={"networks": ["cifar.resnet8", "cifar.wrn_16_1"]})
    groups = d.method.param_groups()
    assert [g.name for g in groups] == ["net0", "net1"]
    for g, member in zip(groups, d.student.members, strict=True):
        assert {id(p) for p in g.params} == {id(p) for p in member.parameters()}
    opt = GroupedOptimizer([make_optimizer(g, 0.1, 0.9, False, 5e-4) for g in groups], [g.name for g in groups])
    _, losses = d.forward_train(_batch(), StepInfo())
    sum(losses.values()).backward()
    before = [[p.detach().clone() for p in m.parameters()] for m in d.student.members]
    opt.group_of("net1").step()  # only net1's optimizer
    assert all(torch.equal(a, p) for a, p in zip(before[0], d.student.members[0].parameters(), strict=True))
    assert any(not torch.equal(a, p) for a, p in zip(before[1], d.student.members[1].parameters(), strict=True))


def test_online_methods_need_a_cohort() -> None:
    with pytest.raises(ConfigError, match="online.peers"):
        _distiller("dml", "cifar.resnet8")
    with pytest.raises(ConfigError, match="shared trunk"):
        _distiller("oekd", "online.peers", model_kwargs={"networks": ["cifar.resnet8"] * 2})
    with pytest.raises(ConfigError, match="at least 3"):
        _distiller("ffsd", "online.peers", model_kwargs={"networks": ["cifar.resnet8"] * 2})


def test_oekd_feature_term_trains_adapters_and_students_not_the_pseudo_teacher() -> None:
    d = _distiller("oekd", "online.oekd_resnet", model_kwargs={"depth": 8, "num_students": 3})
    _, losses = d.forward_train(_batch(), StepInfo())
    assert set(losses) == {"ce", "kd", "feature"}
    routed = _grads_by_group(d, losses["feature"])
    assert routed == {"trunk": True, "student1": False, "student2": True, "student3": True, "adapters": True}
    groups = {g.name: g for g in d.method.param_groups()}
    assert groups["adapters"].lr_scale == 0.5 and groups["student1"].optimizer == "adam"
    # 1×1 adapters from student j's stage widths to the pseudo-teacher's
    assert [a.weight.shape[:2] for a in d.method.adapters[1]] == [(16, 5), (32, 10), (64, 21)]


def test_oekd_pseudo_teacher_only_trains_the_common_base() -> None:
    d = _distiller("oekd", "online.oekd_resnet",
                   model_kwargs={"depth": 8, "num_students": 3, "shared_base_grad": "pseudo_teacher_only"})
    _, losses = d.forward_train(_batch(), StepInfo())
    assert _grads_by_group(d, losses["feature"])["trunk"] is False  # students 2..N do not reach the base
    assert _grads_by_group(d, losses["ce"])["trunk"] is True  # student 1's CE does


def test_ffsd_every_loss_reaches_only_its_group() -> None:
    d = _distiller("ffsd", "online.peers",
                   model_kwargs={"networks": ["cifar.resnet8"] * 3, "names": ["student1", "student2", "leader"]})
    _, losses = d.forward_train(_batch(), StepInfo(epoch=6))
    expected = {
        "ce": {"student1", "student2"}, "mutual": {"student1", "student2"}, "diversity": {"student2"},
        "fusion": {"fusion"}, "leader_ce": {"leader"}, "leader_kd": {"leader"}, "leader_fusion": {"leader"},
        "decoders": {"decoders"},
    }
    assert set(losses) == set(expected)
    for name, groups in expected.items():
        routed = _grads_by_group(d, losses[name])
        assert {g for g, hit in routed.items() if hit} == groups, name
    groups = {g.name: g for g in d.method.param_groups()}
    assert groups["decoders"].optimizer == "adam" and groups["fusion"].weight_decay == 1e-5
    # the leader's group holds the trans-fusion head Ψ
    assert {id(p) for p in d.method.trans_fusion.parameters()} <= {id(p) for p in groups["leader"].params}


def test_ffsd_decoders_rebuild_the_shallower_stage_shapes() -> None:
    d = _distiller("ffsd", "online.peers", model_kwargs={"networks": ["cifar.resnet8"] * 3})
    outs = d.method.decoders[0](torch.zeros(2, 64, 4, 4))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 8, 8), (2, 16, 16, 16)]


def test_mcl_terms_and_routing_between_networks() -> None:
    d = _distiller("mcl", "online.peers", model_kwargs={"networks": ["cifar.resnet8"] * 2})
    _, losses = d.forward_train(_batch(), StepInfo())
    assert set(losses) == {"ce", "vcl", "soft_vcl", "icl", "soft_icl"}
    assert _grads_by_group(d, losses["icl"]) == {"net0": True, "net1": True}  # a joint term over the pair
    heads = {g.name: {id(p) for p in g.params} for g in d.method.param_groups()}
    assert {id(p) for p in d.method.heads[1].parameters()} <= heads["net1"]


def test_mcl_okd_updates_each_branch_bank_at_the_batch_rows_and_dot_trains_the_last_branch() -> None:
    d = _distiller("mcl_okd", "online.branch_resnet", model_kwargs={"depth": 8, "num_branches": 3},
                   num_negatives=4, num_samples=16)
    bank = d.method.memory.bank("memory_branch1").clone()
    d.train()
    _, losses = d.forward_train(_batch(), StepInfo())
    after = d.method.memory.bank("memory_branch1")
    changed = (after != bank).any(1)
    assert changed[:8].all() and not changed[8:].any()
    routed = _grads_by_group(d, losses["dot"])
    assert routed == {"trunk": True, "branch0": False, "branch1": False, "branch2": True}
    assert _grads_by_group(d, losses["nce"]) == {"trunk": True, "branch0": True, "branch1": True, "branch2": True}


def test_hkd_teacher_frozen_heads_trained_and_memory_momentum() -> None:
    teacher = create_model("cifar.resnet14", num_classes=4)
    d = _distiller("hkd", "cifar.resnet8", teachers=(teacher,), num_negatives=6, num_samples=16)
    assert d.method.param_groups() is None  # one optimizer: student and the heads
    old = d.method.memory.memory_teacher.clone()
    d.train()
    batch = _batch(8)
    _, losses = d.forward_train(batch, StepInfo())
    assert set(losses) == {"ce", "individual", "holistic"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teachers.parameters())
    for module in (d.method.embed_teacher, d.method.graph_teacher, d.method.graph_student, d.student):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    with torch.no_grad():
        h_t = d.method.embed_teacher(d.teacher_forward(0, batch.images).features["pooled"])
    expected = F.normalize(0.9 * old[:8] + 0.1 * h_t, dim=1)
    torch.testing.assert_close(d.method.memory.memory_teacher[:8], expected, rtol=1e-4, atol=1e-5)
    # a batch smaller than k = 8 neighbours has no holistic term
    _, small = d.forward_train(_batch(6), StepInfo())
    assert "holistic" not in small and build_method("hkd_kd", student=create_model("cifar.resnet8", num_classes=4),
                                                    teachers=[teacher], facts=RunFacts(input_size=SIZE, num_samples=16),
                                                    num_negatives=4).options.kd_weight == 1.0
