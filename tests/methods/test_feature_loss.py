"""The shared CE + β·Σ feature-loss method (AT, NST, SP, PKT): a method written on it by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import kdistill
from kdistill.features import FeatureRecorder
from kdistill.methods import Batch, StepInfo
from kdistill.methods.base import RunFacts
from kdistill.methods.feature_loss import FeatureLossMethod, FeatureLossOptions
from kdistill.step import Distiller


class MeanGap(FeatureLossMethod):
    """|mean(student) − mean(teacher)| per pair: a loss simple enough to recompute from the taps."""

    name = "mean_gap"
    Options = FeatureLossOptions

    def feature_loss(self, student: Tensor, teacher: Tensor) -> Tensor:
        return (student.mean() - teacher.mean()).abs()


def run(pairs: str, beta: float = 3.0):
    torch.manual_seed(0)
    s = kdistill.create_model("cifar.resnet8", num_classes=5)
    t = kdistill.create_model("cifar.resnet14", num_classes=5)
    cls = type(f"MeanGap_{pairs}", (MeanGap,), {"pairs": pairs})
    method = cls(s, [t], FeatureLossOptions(ce_weight=0.5, feat_weight=beta), RunFacts(input_size=(3, 16, 16)))
    d = Distiller(s, [t], method).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    logits, losses = d.forward_train(Batch(x, y), StepInfo())
    return method, d, x, y, logits, losses


@pytest.mark.parametrize("pairs, count", [("stages", 3), ("last_stage", 1), ("pooled", 1)])
def test_losses_equal_ce_and_beta_times_the_summed_feature_gaps(pairs: str, count: int) -> None:
    method, d, x, y, logits, losses = run(pairs)
    assert len(method.student_features) == len(method.teacher_features) == count
    if pairs == "pooled":
        assert method.student_features == method.teacher_features == ["pooled"]
    assert losses["ce"].item() == pytest.approx(0.5 * F.cross_entropy(logits, y).item(), rel=1e-6)
    # the features again, recorded on plain forward passes of each network
    feats = []
    for net, keys in ((method.student_net, method.student_features), (method.teacher_nets[0], method.teacher_features)):
        with torch.no_grad(), FeatureRecorder(net.model, net.tap_specs(keys)) as rec:
            net.model(x)
        feats.append(rec.features)
    s_feats, t_feats = feats
    gap = sum((s_feats[a].mean() - t_feats[b].mean()).abs()
              for a, b in zip(method.student_features, method.teacher_features, strict=True))
    assert losses["mean_gap"].item() == pytest.approx(3.0 * float(gap), rel=1e-5)
    losses["mean_gap"].backward()
    assert all(p.grad is None for p in d.teachers[0].parameters())


def test_unknown_pairs_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="must be 'stages', 'last_stage' or 'pooled', not 'middle'"):
        run("middle")
