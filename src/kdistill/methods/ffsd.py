"""FFSD: feature fusion and self-distillation (Li et al., IEEE TNNLS 2022), docs/online.md.

The cohort (``online.peers``, e.g. three resnet20s named ``student1, student2, leader``) holds m
common students followed by the leader, the only deployed network. Common students learn from
the labels and from each other; a fusion module combines their detached last-stage maps into
fused logits; the leader learns from the fused logits and the fusion module's attention; small
decoders rebuild each network's shallower stages from its last one (self-distillation), and
students 2..m are pushed towards attention maps unlike their predecessor's.

Every cross-network input is detached, so one backward pass of the summed losses gives each
group (students, fusion, leader, decoders) exactly the gradient of its own loss; the groups have
their own optimizers (the decoders Adam, the fusion module a lower weight decay).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.features import TappedModel, stage_taps
from kdistill.losses import (
    attention_map,
    diversity_loss,
    diversity_target,
    ffsd_warmup,
    kd_loss,
    normalized_distance,
)
from kdistill.methods._cohort import params, require_cohort
from kdistill.methods.base import (
    Batch,
    Method,
    MethodOptions,
    ModelOutput,
    StepInfo,
    check_positive,
    check_weight,
    register_method,
)
from kdistill.optim import ParamGroup
from kdistill.utils import ConfigError


def _init_conv(module: nn.Module) -> None:
    """Convolutions ~ N(0, sqrt(2 / (k·k·out))), BatchNorm weight 1 / bias 0 (the authors' init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _dw_pw(in_ch: int, out_ch: int) -> nn.Sequential:
    """3×3 depthwise conv → BN → ReLU → 1×1 conv → BN → ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(),
        nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(),
    )


class FusionModule(nn.Module):
    """Fuses the common students' last maps (concatenated): hidden map ``H_f`` and fused logits ``z_f``."""

    def __init__(self, in_channels: int, channels: int, num_classes: int):
        super().__init__()
        self.fuse = _dw_pw(in_channels, channels)
        self.fc = nn.Linear(channels, num_classes)
        _init_conv(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.fuse(x)
        return hidden, self.fc(torch.flatten(F.adaptive_avg_pool2d(hidden, 1), 1))


class Decoder(nn.Module):
    """Rebuilds the shallower stage maps from the last one: per step a 3×3 transposed conv (stride 2,
    output padding 1, no bias) → BN → ReLU; outputs deepest-but-one first."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(a, b, 3, 2, 1, output_padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(channels[:-1], channels[1:], strict=True)
        )
        _init_conv(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs


@dataclass
class FFSDOptions(MethodOptions):
    """Defaults are the authors' CIFAR-100 settings: λ_div 1e-5, λ_sd 1000, λ_f 10, T = 2, warm-up of
    the three λ over 5 epochs; fusion weight decay 1e-5; decoders Adam lr 1e-3, weight decay 1e-4."""

    temperature: float = 2.0
    diversity_weight: float = 1e-5
    self_distill_weight: float = 1000.0
    fusion_weight: float = 10.0
    warmup_epochs: int = 5
    fusion_weight_decay: float = 1e-5
    decoder_lr: float = 1e-3
    decoder_weight_decay: float = 1e-4

    def check(self) -> None:
        check_positive("temperature", self.temperature)
        for name in ("diversity_weight", "self_distill_weight", "fusion_weight", "fusion_weight_decay",
                     "decoder_weight_decay"):
            check_weight(name, getattr(self, name))
        check_positive("decoder_lr", self.decoder_lr)
        if int(self.warmup_epochs) < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")


@register_method
class FFSD(Method):
    """Common students + fusion module + leader + self-distillation decoders (the last network leads)."""

    name = "ffsd"
    Options = FFSDOptions
    options: FFSDOptions
    needs_teacher = False

    def build(self, student: TappedModel, teachers: list[TappedModel]) -> None:
        cohort = require_cohort(self.name, student, min_members=3, trunk=False)
        self.cohort = [cohort]
        names = cohort.names
        self.m = len(names) - 1  # common students; the last network is the leader
        preset = stage_taps(cohort)
        self.stage_keys = [[k for k in preset if k.startswith(f"{n}/stage")] for n in names]
        if any(len(keys) < 2 or len(keys) != len(self.stage_keys[0]) for keys in self.stage_keys):
            raise ConfigError(f"{self.name}: every network needs the same number (>= 2) of stages, got {self.stage_keys}")
        self.logit_keys = [f"{n}/logits" for n in names]
        self.student_features = [*self.logit_keys, *(k for keys in self.stage_keys for k in keys)]
        shapes = self.probe(student, [k for keys in self.stage_keys for k in keys])
        last = [shapes[keys[-1]] for keys in self.stage_keys]
        if len({s[1:] for s in last}) != 1:
            raise ConfigError(f"{self.name}: the last stages must have one spatial size, got {last}")
        student_channels = sum(s[0] for s in last[:-1])
        leader_channels = last[-1][0]
        num_classes = self.facts.num_classes or cohort.members[-1](torch.zeros(2, *self.input_size)).shape[1]
        self.fusion = FusionModule(student_channels, leader_channels, int(num_classes))
        self.trans_fusion = _dw_pw(leader_channels, student_channels)  # Ψ on the leader's last map
        _init_conv(self.trans_fusion)
        # decoders: students 2..m and the leader, each from its own stage shapes (deep to shallow)
        self.decoders = nn.ModuleList()
        for keys in self.stage_keys[1:]:
            chain = [shapes[k] for k in reversed(keys)]
            for deep, shallow in zip(chain[:-1], chain[1:], strict=True):
                if shallow[1:] != torch.Size([2 * deep[1], 2 * deep[2]]):
                    raise ConfigError(f"{self.name}: decoders double the resolution per stage, got {chain}")
            self.decoders.append(Decoder([c[0] for c in chain]))

    def select_teachers(self, info: StepInfo) -> list[int]:
        return []

    def param_groups(self) -> list[ParamGroup]:
        o = self.options
        cohort = self.cohort[0]
        groups = [ParamGroup(n, params(net)) for n, net in zip(cohort.names[:-1], cohort.members[:-1], strict=True)]
        groups.append(ParamGroup("fusion", params(self.fusion), weight_decay=o.fusion_weight_decay))
        groups.append(ParamGroup(cohort.names[-1], params(cohort.members[-1], self.trans_fusion)))
        groups.append(ParamGroup("decoders", params(self.decoders), optimizer="adam", lr=o.decoder_lr,
                                 weight_decay=o.decoder_weight_decay))
        return groups

    @staticmethod
    def _shifted(prev_last: Tensor) -> Tensor:
        """The predecessor's last map rescaled per position so that its attention follows the diversity target."""
        a = attention_map(prev_last)
        y_hat = F.normalize(a.flatten(1), dim=1)
        target = F.normalize(diversity_target(a).clamp_min(0), dim=1)
        scale = (target / y_hat.clamp_min(1e-8)).sqrt().view_as(a).unsqueeze(1)
        return (prev_last.float() * scale).detach()

    def _self_distill(self, maps: Sequence[Tensor], decoder: Decoder, source: Tensor) -> Tensor:
        """``Σ_k D(a(F_k), a(sg Dec_k(source)))`` over the shallower stages (deep to shallow)."""
        with torch.no_grad():
            rebuilt = decoder(source.detach())
        shallower = list(reversed(maps[:-1]))
        return sum(normalized_distance(attention_map(f), attention_map(r)) for f, r in zip(shallower, rebuilt, strict=True))

    def forward(
        self, batch: Batch, student: ModelOutput, teachers: Sequence[ModelOutput], info: StepInfo
    ) -> dict[str, Tensor]:
        o = self.options
        y = batch.targets
        t = o.temperature
        lam_div, lam_sd, lam_f = (ffsd_warmup(w, info.epoch, int(o.warmup_epochs))
                                  for w in (o.diversity_weight, o.self_distill_weight, o.fusion_weight))
        logits = [student.features[k] for k in self.logit_keys]
        maps = [[student.features[k] for k in keys] for keys in self.stage_keys]
        students, leader = logits[:-1], logits[-1]
        m = self.m
        losses: dict[str, Tensor] = {
            "ce": sum(F.cross_entropy(z, y) for z in students),
            "mutual": sum(kd_loss(students[i], students[j], t) for i in range(m) for j in range(m) if j != i) / (m - 1),
        }
        diversity = []
        for i in range(1, m):  # students 2..m: away from the predecessor's attention, plus self-distillation
            prev_last = maps[i - 1][-1].detach()
            div = diversity_loss(attention_map(maps[i][-1]), attention_map(prev_last))
            diversity.append(div + self._self_distill(maps[i], self.decoders[i - 1], self._shifted(prev_last)))
        if diversity:
            losses["diversity"] = lam_div * sum(diversity)
        # fusion module on the students' detached last maps
        hidden, fused = self.fusion(torch.cat([f[-1].detach() for f in maps[:-1]], dim=1))
        mean_students = torch.stack(students).mean(0).detach()
        losses["fusion"] = F.cross_entropy(fused, y) + kd_loss(fused, mean_students, t)
        # leader
        leader_last = maps[-1][-1]
        students_cat = torch.cat([f[-1] for f in maps[:-1]], dim=1).detach()
        losses["leader_ce"] = F.cross_entropy(leader, y)
        losses["leader_kd"] = kd_loss(leader, fused.detach(), t)
        losses["leader_fusion"] = lam_f * (
            normalized_distance(attention_map(leader_last), attention_map(hidden.detach()))
            + normalized_distance(attention_map(self.trans_fusion(leader_last)), attention_map(students_cat))
            + self._self_distill(maps[-1], self.decoders[-1], hidden)
        )
        # decoders: each rebuilds its own network's shallower maps from that network's detached last map
        rebuild = []
        for decoder, net_maps in zip(self.decoders, maps[1:], strict=True):
            outs = decoder(net_maps[-1].detach())
            for out, target in zip(outs, reversed(net_maps[:-1]), strict=True):
                target = target.detach()
                rebuild.append(normalized_distance(out, target) + normalized_distance(attention_map(out), attention_map(target)))
        losses["decoders"] = lam_sd * sum(rebuild)
        return losses
