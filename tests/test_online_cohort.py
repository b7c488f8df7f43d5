"""Several networks in one model (Cohort) and several optimizers driven as one (GroupedOptimizer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.features import stage_taps
from kdistill.models import create_model
from kdistill.optim import GroupedOptimizer, ParamGroup, make_optimizer
from kdistill.utils import ConfigError


def test_cohort_deploys_a_member_the_best_or_the_ensemble() -> None:
    torch.manual_seed(0)
    cohort = create_model("online.peers", num_classes=5, networks=["cifar.resnet8", "cifar.wrn_16_1"], deploy="net1")
    x = torch.randn(2, 3, 32, 32)
    cohort.eval()
    outs = cohort.forward_all(x)
    assert [o.shape for o in outs] == [(2, 5), (2, 5)]
    torch.testing.assert_close(cohort(x), outs[1])
    cohort.deploy = cohort._check_deploy("ensemble")
    torch.testing.assert_close(cohort(x), (outs[0] + outs[1]) / 2)
    cohort.deploy = cohort._check_deploy("best")
    cohort.best_index.fill_(1)
    torch.testing.assert_close(cohort(x), outs[1])
    assert "best_index" in cohort.state_dict()
    with pytest.raises(ConfigError, match="deploy='leader'.*best.*ensemble.*net0"):
        cohort._check_deploy("leader")
    with pytest.raises(ConfigError, match=r"\[0, 2\)"):
        cohort._check_deploy(2)


def test_deployed_member_rebuilds_by_its_own_name_with_the_shared_trunk() -> None:
    torch.manual_seed(0)
    cohort = create_model("online.oekd_resnet", num_classes=4, depth=8, num_students=3, deploy=2).eval()
    module, name, kwargs = cohort.deployed()
    assert name == "online.split_resnet" and kwargs["branch_widths"] == [5, 10, 21]
    alone = create_model(name, num_classes=4, **kwargs).eval()
    alone.load_state_dict(module.state_dict())  # strict: same keys and shapes
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(alone(x), cohort.forward_all(x)[2])
    # the common base is one module shared by every student
    assert sum(p.numel() for p in cohort.parameters()) == sum(
        p.numel() for p in cohort.trunk.parameters()) + sum(p.numel() for m in cohort.members for p in m.parameters())


def test_branch_cohort_shares_low_stages_and_offers_per_member_taps() -> None:
    cohort = create_model("online.branch_resnet", num_classes=4, depth=8, num_branches=3)
    taps = stage_taps(cohort)
    assert taps["trunk/stage1"] == "trunk.layer1"
    assert [k for k in taps if k.startswith("branch2/")] == ["branch2/logits", "branch2/stage2", "branch2/stage3",
                                                            "branch2/pooled"]
    assert taps["branch2/pooled"] == "members.2.avgpool"
    assert stage_taps(cohort, preact=True)["branch1/stage3"] == "members.1.layer3.0.bn2+members.1.layer3.0.downsample"


def test_grouped_optimizer_steps_each_member_on_its_groups_with_its_own_schedule() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    sgd = make_optimizer(ParamGroup("a", list(a.parameters())), lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0)
    adam = make_optimizer(ParamGroup("b", list(b.parameters()), optimizer="adam", lr=1e-3), 0.1, 0.9, True, 0.0)
    opt = GroupedOptimizer([sgd, adam], ["a", "b"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    before_a = a.weight.detach().clone()
    x = torch.randn(4, 3)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = a(x).pow(2).sum() + b(x).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    grad_a = a.weight.grad.clone()
    torch.testing.assert_close(a.weight, before_a - 0.1 * grad_a)  # plain SGD on a
    assert len(opt.state) == 2  # Adam's state for b's two tensors; SGD without momentum keeps none
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.0005]
    state = opt.state_dict()
    fresh = GroupedOptimizer([torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters())], ["a", "b"])
    fresh.load_state_dict(state)
    assert [g["lr"] for g in fresh.param_groups] == [0.05, 0.0005]
    with pytest.raises(ValueError, match="do not match"):
        GroupedOptimizer([torch.optim.SGD(a.parameters(), lr=0.1)], ["x"]).load_state_dict(
            {"names": ["a"], "optimizers": [state["optimizers"][0]]})
    with pytest.raises(ValueError, match="two optimizers"):
        GroupedOptimizer([torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(a.parameters(), lr=0.1)])
