"""Several networks trained together in one run (online distillation), as one model.

A ``Cohort`` holds a list of member networks (possibly of different architectures), optionally
behind a shared trunk (the common base of OEKD, the shared low-level stages of MCL-OKD). Its
``forward`` runs every member and returns the logits of what is *deployed*: one member (by index
or name), the member with the best validation accuracy (``"best"``, recorded by the engine in the
``best_index`` buffer), or the ensemble (the mean of the members' logits). ``forward_all`` returns
every member's logits. Features of a member are tapped by module name under ``members.<i>``; the
stage preset of a cohort offers every member's preset keys prefixed with the member's name
(``net0/stage1``, ``net1/pooled``, ``net0/logits``).

``deployed()`` gives what an export holds: a member as a stand-alone model (rebuilt by its own
registry name), or the whole cohort for the ensemble.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.features import register_stage_preset, stage_taps
from kdistill.models.cifar_resnet import BasicBlock
from kdistill.models.registry import create_model, register_model
from kdistill.utils import ConfigError

DEPLOY_MODES = ("best", "ensemble")


class Cohort(nn.Module):
    """Member networks trained together; ``forward`` returns the deployed logits (see module docstring)."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        names: Sequence[str] | None = None,
        trunk: nn.Module | None = None,
        deploy: str | int = 0,
        member_models: Sequence[tuple[str, dict[str, Any]]] | None = None,
    ):
        super().__init__()
        if len(members) < 1:
            raise ConfigError("a cohort needs at least one member network")
        names = list(names) if names is not None else [f"net{i}" for i in range(len(members))]
        if len(names) != len(members) or len(set(names)) != len(names) or any("/" in n for n in names):
            raise ConfigError(f"member names must be distinct, one per member and without '/', got {names}")
        self.trunk = trunk
        self.members = nn.ModuleList(members)
        self.names = names
        self.member_models = list(member_models) if member_models is not None else None
        self.deploy = self._check_deploy(deploy)
        self.register_buffer("best_index", torch.tensor(0))
        self.trunk_grad_members: list[int] | None = None  # None: every member trains the trunk

    def _check_deploy(self, deploy: str | int) -> str | int:
        if isinstance(deploy, int) or (isinstance(deploy, str) and deploy.isdigit()):
            index = int(deploy)
            if not 0 <= index < len(self.members):
                raise ConfigError(f"deploy={deploy}: a member index must be in [0, {len(self.members)})")
            return index
        if deploy in self.names:
            return self.names.index(deploy)
        if deploy in DEPLOY_MODES:
            return deploy
        allowed = [*DEPLOY_MODES, *self.names, f"0..{len(self.members) - 1}"]
        raise ConfigError(f"deploy={deploy!r}: expected one of {allowed}")

    def forward_all(self, x: Tensor) -> list[Tensor]:
        """Every member's logits, in member order."""
        if self.trunk is None:
            return [member(x) for member in self.members]
        h = self.trunk(x)
        grad = self.trunk_grad_members
        # members outside ``trunk_grad_members`` read the trunk's output without training it
        return [member(h if grad is None or i in grad else h.detach()) for i, member in enumerate(self.members)]

    @staticmethod
    def ensemble(logits: Sequence[Tensor]) -> Tensor:
        """The ensemble's logits: the mean of the members' logits."""
        return torch.stack(list(logits)).mean(0)

    def deployed_index(self) -> int | None:
        """The deployed member's index (``None`` when the ensemble is deployed)."""
        if self.deploy == "ensemble":
            return None
        if self.deploy == "best":
            return int(self.best_index)
        return int(self.deploy)

    def forward(self, x: Tensor) -> Tensor:
        outs = self.forward_all(x)
        index = self.deployed_index()
        return self.ensemble(outs) if index is None else outs[index]

    def member(self, index: int) -> nn.Module:
        """Member ``index`` as a stand-alone network (with the shared trunk in front, if any)."""
        net = self.members[index]
        return net if self.trunk is None else TrunkAndBranch(self.trunk, net)

    def deployed(self) -> tuple[nn.Module, str | None, dict[str, Any]]:
        """``(module, registry name, kwargs)`` of what an export holds: the deployed member rebuilt by
        its own name, or the cohort itself for the ensemble (name ``None``: the run's own model)."""
        index = self.deployed_index()
        if index is None:
            return self, None, {}
        if self.member_models is None:
            raise ConfigError("this cohort does not know how to rebuild a member alone; deploy the ensemble")
        name, kwargs = self.member_models[index]
        return self.member(index), name, dict(kwargs)


class TrunkAndBranch(nn.Module):
    """A shared trunk followed by one branch: one member of a trunk cohort as a stand-alone network."""

    def __init__(self, trunk: nn.Module, branch: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.branch = branch

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(self.trunk(x))


def _prefixed(spec: str, prefix: str) -> str:
    """A tap spec with every module path under ``prefix`` (``a+b:input`` -> ``p.a+p.b:input``)."""
    return "+".join(f"{prefix}.{part}" for part in spec.split("+"))


@register_stage_preset(lambda m: isinstance(m, Cohort))
def _cohort_preset(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    assert isinstance(model, Cohort)
    taps: OrderedDict[str, str] = OrderedDict()
    if model.trunk is not None:
        try:
            taps.update((f"trunk/{k}", _prefixed(v, "trunk")) for k, v in stage_taps(model.trunk, preact).items())
        except ConfigError:
            pass
    for name, member, i in zip(model.names, model.members, range(len(model.members)), strict=True):
        taps[f"{name}/logits"] = f"members.{i}"
        try:
            preset = stage_taps(member, preact)
        except ConfigError:
            continue
        taps.update((f"{name}/{k}", _prefixed(v, f"members.{i}")) for k, v in preset.items())
    return taps


# --- CIFAR ResNets split into a trunk and branches ------------------------------------------------


class ResNetPart(nn.Module):
    """Consecutive stages of a CIFAR ResNet (stage ``k`` is module ``layer<k>``, numbered as in the
    whole network), optionally with the stem in front and the pool + classifier behind."""

    def __init__(
        self,
        depth: int,
        in_channels: int,
        widths: Sequence[int],
        first_stage: int = 1,
        stem: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        channels = in_channels
        if stem:
            self.conv1 = nn.Conv2d(3, in_channels, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.relu = nn.ReLU()
        self.has_stem = stem
        self.stage_names = []
        for offset, width in enumerate(widths):
            stage = first_stage + offset
            stride = 1 if stage == 1 else 2
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            blocks = [BasicBlock(channels, width, stride, downsample)] + [BasicBlock(width, width) for _ in range(1, n)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            self.stage_names.append(f"layer{stage}")
            channels = width
        self.out_channels = channels
        self.has_head = num_classes is not None
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.has_stem:
            x = self.relu(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.has_head:
            x = self.fc(torch.flatten(self.avgpool(x), 1))
        return x


@register_stage_preset(lambda m: isinstance(m, ResNetPart))
def _resnet_part_preset(model: nn.Module, preact: bool) -> OrderedDict[str, str]:
    assert isinstance(model, ResNetPart)
    taps: OrderedDict[str, str] = OrderedDict()
    if model.has_stem:
        taps["stem"] = "relu"
    for name in model.stage_names:
        if preact:
            block = f"{name}.{len(getattr(model, name)) - 1}"
            has_proj = getattr(model, name)[-1].downsample is not None
            taps[f"stage{name[5:]}"] = f"{block}.bn2+" + (f"{block}.downsample" if has_proj else f"{block}:input")
        else:
            taps[f"stage{name[5:]}"] = name
    if model.has_head:
        taps["pooled"] = "avgpool"
    return taps


def _split_parts(
    depth: int, stem_width: int, trunk_widths: Sequence[int], branch_widths: Sequence[int], num_classes: int
) -> tuple[ResNetPart, ResNetPart]:
    trunk = ResNetPart(depth, stem_width, list(trunk_widths), 1, stem=True)
    branch = ResNetPart(depth, trunk.out_channels, list(branch_widths), 1 + len(trunk_widths), num_classes=num_classes)
    return trunk, branch


@register_model("online.split_resnet")
def split_resnet(
    num_classes: int = 100,
    depth: int = 20,
    stem_width: int = 16,
    trunk_widths: Sequence[int] = (),
    branch_widths: Sequence[int] = (16, 32, 64),
) -> nn.Module:
    """One member of a trunk cohort alone: CIFAR ResNet stem + ``trunk_widths`` stages, then
    ``branch_widths`` stages with pool and classifier (``trunk.*`` / ``branch.*`` parameters)."""
    trunk, branch = _split_parts(depth, stem_width, trunk_widths, branch_widths, num_classes)
    return TrunkAndBranch(trunk, branch)


def _member_widths(widths: Sequence[int], num_members: int, num_blocks: int) -> list[list[int]]:
    from kdistill.losses.oekd import oekd_widths

    return oekd_widths(list(widths), num_members, num_blocks)


@register_model("online.oekd_resnet")
def oekd_resnet(
    num_classes: int = 100,
    depth: int = 110,
    num_students: int = 5,
    widths: Sequence[int] = (16, 32, 64),
    num_blocks: int = 3,
    deploy: str | int = 0,
    shared_base_grad: str = "all",
) -> Cohort:
    """OEKD's student ensemble: a common stem and ``num_students`` CIFAR ResNet branches of the same
    depth, student ``j`` with ``w·(N-j+1)//N`` channels in its last ``num_blocks`` stages.
    ``shared_base_grad``: ``all`` students train the common base, or ``pseudo_teacher_only``."""
    if shared_base_grad not in ("all", "pseudo_teacher_only"):
        raise ConfigError(f"shared_base_grad must be 'all' or 'pseudo_teacher_only', got {shared_base_grad!r}")
    if int(num_students) < 2:
        raise ConfigError(f"online.oekd_resnet: num_students must be >= 2, got {num_students}")
    stem_width = int(widths[0])
    trunk = ResNetPart(depth, stem_width, [], 1, stem=True)
    members, specs = [], []
    for w in _member_widths(widths, int(num_students), int(num_blocks)):
        members.append(ResNetPart(depth, stem_width, w, 1, num_classes=num_classes))
        specs.append(("online.split_resnet", {"depth": depth, "stem_width": stem_width, "trunk_widths": [],
                                              "branch_widths": w}))
    cohort = Cohort(members, [f"student{j + 1}" for j in range(len(members))], trunk, deploy, specs)
    cohort.trunk_grad_members = None if shared_base_grad == "all" else [0]
    return cohort


@register_model("online.branch_resnet")
def branch_resnet(
    num_classes: int = 100,
    depth: int = 32,
    num_branches: int = 4,
    widths: Sequence[int] = (16, 32, 64),
    shared_stages: int = 1,
    deploy: str | int = 0,
) -> Cohort:
    """MCL-OKD's peers: a CIFAR ResNet whose stem and first ``shared_stages`` stages are shared and
    whose deeper stages and classifier are repeated ``num_branches`` times."""
    if int(num_branches) < 2:
        raise ConfigError(f"online.branch_resnet: num_branches must be >= 2, got {num_branches}")
    if not 0 <= int(shared_stages) < len(widths):
        raise ConfigError(f"online.branch_resnet: shared_stages must be in [0, {len(widths)}), got {shared_stages}")
    trunk_w, branch_w = list(widths[:shared_stages]), list(widths[shared_stages:])
    trunk, _ = _split_parts(depth, widths[0], trunk_w, branch_w, num_classes)
    members = [_split_parts(depth, widths[0], trunk_w, branch_w, num_classes)[1] for _ in range(int(num_branches))]
    spec = ("online.split_resnet", {"depth": depth, "stem_width": widths[0], "trunk_widths": trunk_w,
                                    "branch_widths": branch_w})
    return Cohort(members, [f"branch{i}" for i in range(len(members))], trunk, deploy, [spec] * len(members))


@register_model("online.peers")
def peers(
    num_classes: int = 100,
    networks: Sequence[str] = ("cifar.resnet20", "cifar.resnet20"),
    names: Sequence[str] | None = None,
    deploy: str | int = 0,
) -> Cohort:
    """Independent networks by registry name (any architectures with the same classes)."""
    if len(networks) < 2:
        raise ConfigError(f"online.peers: needs at least 2 networks, got {list(networks)}")
    members = [create_model(n, num_classes=num_classes) for n in networks]
    return Cohort(members, names, None, deploy, [(n, {}) for n in networks])
