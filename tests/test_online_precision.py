"""Mixed precision for the online methods and HKD: their losses run in float32 under autocast, every
member of a cohort has a float32 classifier, and a bf16 step matches the float32 step."""

from __future__ import annotations

import copy

import pytest
import torch

from kdistill.engine.precision import float32_classifier
from kdistill.losses import (
    GraphConv1Hop,
    MemoryBank,
    hkd_losses,
    knn_graph,
    mcl_losses,
    mcl_okd_nce,
    memory_infonce,
    mutual_kl,
    oekd_loss,
    supcon_matrix_loss,
)
from kdistill.losses.ffsd import attention_map, diversity_loss, normalized_distance
from kdistill.methods import Batch, RunFacts, StepInfo, build_method
from kdistill.models import create_model
from kdistill.step import Distiller

g = torch.Generator().manual_seed(0)
LOGITS = [torch.randn(8, 10, generator=g) * 3 for _ in range(3)]
TARGET = torch.arange(8) % 4
EMB = [torch.nn.functional.normalize(torch.randn(8, 12, generator=g), dim=1) for _ in range(2)]
MAPS = [torch.randn(8, 6, 4, 4, generator=g) for _ in range(3)]
torch.manual_seed(0)
ADAPTERS = [[torch.nn.Conv2d(6, 6, 1)] for _ in range(2)]
BANK = MemoryBank(["a", "b"], 16, 12, 0.5)
CONTRAST = torch.randint(0, 16, (8, 5), generator=g)
NEG = torch.randint(0, 16, (8, 6), generator=g)
GCONV = GraphConv1Hop(12)
ADJ = knn_graph(LOGITS[0], 3)
SIM = EMB[0] @ EMB[1].t() / 0.1  # the inputs of the losses are computed outside autocast
GRAPH = [GCONV(e, ADJ).detach() for e in EMB]


def _sum(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([v for v in d.values()])


LOSSES = {
    "mutual_kl": lambda: mutual_kl(LOGITS, 2.0),
    "oekd": lambda: _sum(oekd_loss(LOGITS, TARGET, [[m] for m in MAPS], ADAPTERS)),
    "supcon": lambda: supcon_matrix_loss(SIM, TARGET),
    "mcl": lambda: _sum(mcl_losses(EMB, TARGET)),
    "mcl_okd_nce": lambda: mcl_okd_nce(EMB, BANK, CONTRAST),
    "ffsd_distance": lambda: normalized_distance(attention_map(MAPS[0]), attention_map(MAPS[1])),
    "ffsd_diversity": lambda: diversity_loss(attention_map(MAPS[0]), attention_map(MAPS[1])),
    "knn_graph": lambda: knn_graph(LOGITS[0], 3),
    "infonce": lambda: memory_infonce(EMB[0], EMB[1], BANK.bank("a"), NEG),
    "hkd": lambda: _sum(hkd_losses(EMB[0], EMB[1], GRAPH[0], GRAPH[1], BANK.bank("a"), BANK.bank("b"), torch.arange(8),
                                   NEG)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_online_loss_runs_in_float32_under_autocast(name: str) -> None:
    """Bit for bit the float32 value under bf16 autocast: the similarity matrices, memory scores,
    OEKD's adapters and the kNN distances would otherwise be bf16 matrix products."""
    plain = LOSSES[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = LOSSES[name]()
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain), (mixed, plain)


def test_graph_conv_normalises_in_float32() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = GCONV(EMB[0], ADJ)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(8), rtol=0, atol=1e-6)


def test_every_cohort_member_gets_a_float32_classifier() -> None:
    cohort = create_model("online.peers", num_classes=4, networks=["cifar.resnet8", "cifar.wrn_16_1"])
    x = torch.randn(2, 3, 16, 16)
    float32_classifier(cohort)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [z.dtype for z in cohort.forward_all(x)] == [torch.float32, torch.float32]
    float32_classifier(cohort, enabled=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [z.dtype for z in cohort.forward_all(x)] == [torch.bfloat16, torch.bfloat16]


SIZE = (3, 16, 16)
R8 = "cifar.resnet8"
CASES = {
    "dml": ("online.peers", {"networks": [R8, R8]}, {}),
    "oekd": ("online.oekd_resnet", {"depth": 8, "num_students": 3}, {}),
    "mcl": ("online.peers", {"networks": [R8, R8]}, {}),
    "mcl_okd": ("online.branch_resnet", {"depth": 8, "num_branches": 3}, {"num_negatives": 4}),
    "ffsd": ("online.peers", {"networks": [R8, R8, R8]}, {}),
    "hkd": ("cifar.resnet8", {}, {"num_negatives": 6}),
}
# measured on these tiny networks: at most 0.43% relative (bf16 keeps 8 mantissa bits, 2^-8 = 0.4%),
# except MCL's soft terms (0.36% soft VCL, 1.9% soft ICL): KL divergences between two nearly equal
# similarity distributions, small values of which the networks' bf16 rounding is a larger share
STEP_TOLERANCE = 1e-2
SOFT_TOLERANCE = 5e-2


@pytest.mark.parametrize("method", sorted(CASES))
def test_bf16_online_step_matches_the_float32_step(method: str) -> None:
    """The whole step under bf16 autocast, as ``trainer.precision=bf16-mixed`` runs it, gives every loss
    term within ``STEP_TOLERANCE`` (MCL's soft terms ``SOFT_TOLERANCE``) of the float32 step, as
    float32 tensors (and not bit-identical: the networks did run in bf16)."""
    model, kwargs, options = CASES[method]
    torch.manual_seed(0)
    student = create_model(model, num_classes=4, **kwargs)
    teachers = [create_model("cifar.resnet14", num_classes=4)] if method == "hkd" else []
    facts = RunFacts(input_size=SIZE, num_samples=16, num_classes=4, train_targets=torch.arange(16) % 4)
    m = build_method(method, student=student, teachers=teachers, facts=facts, **options)
    plain = Distiller(student, teachers, m).train()
    mixed = copy.deepcopy(plain)
    mixed.configure_teachers("bf16")
    float32_classifier(mixed.student)
    gen = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(8, *SIZE, generator=gen), torch.arange(8) % 4, torch.arange(8))
    info = StepInfo(epoch=6)  # FFSD's warm-up is over
    torch.manual_seed(2)  # the contrast samplers draw negatives
    _, ref = plain.forward_train(batch, info)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, got = mixed.forward_train(batch, info)
    assert logits.dtype == torch.float32
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == torch.float32, k
        tolerance = SOFT_TOLERANCE if k.startswith("soft_") else STEP_TOLERANCE
        assert got[k].item() == pytest.approx(ref[k].item(), rel=tolerance), k
    assert any(not torch.equal(got[k], ref[k]) for k in ref), "the bf16 step ran in float32"
