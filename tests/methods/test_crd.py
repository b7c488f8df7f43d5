"""CRD (memory bank, NCE, method); docs/methods/crd.md."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill import create_model
from kdistill.losses import ContrastMemory, CRDLoss, crd_nce_loss
from kdistill.methods import Batch, StepInfo, build_method
from kdistill.step import Distiller
from kdistill.utils import ConfigError


def _unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


# --- NCE loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "expected"), [(1, 2 * math.log(2)), (4, 2.502012)])
def test_nce_loss_uniform_scores_hand_values(k: int, expected: float) -> None:
    n = 100  # the ε term shifts the value by ~1e-5 at this size
    probs = torch.full((3, k + 1), 1.0 / n)
    assert crd_nce_loss(probs, n).item() == pytest.approx(expected, abs=1e-4)
    assert expected == pytest.approx(-(math.log(1 / 5) + 4 * math.log(4 / 5)) if k == 4 else 1.386294, abs=1e-6)


def test_nce_loss_positive_is_column_zero() -> None:
    # a large positive score costs little, the same score on a negative costs a lot
    n = 100
    good = torch.tensor([[0.5, 1e-4, 1e-4]])
    bad = torch.tensor([[1e-4, 0.5, 1e-4]])
    assert crd_nce_loss(good, n) < 0.1 < crd_nce_loss(bad, n)


# --- memory bank --------------------------------------------------------------------------------


def test_first_forward_sets_z_so_mean_normalised_score_is_one_over_n() -> None:
    torch.manual_seed(0)
    n = 50
    mem = ContrastMemory(feat_dim=8, num_data=n, num_negatives=10)
    assert mem.z_student.item() == -1 and mem.z_teacher.item() == -1
    probs_s, probs_t = mem(_unit(4, 8), _unit(4, 8), torch.tensor([0, 1, 2, 3]))
    assert probs_s.shape == probs_t.shape == (4, 11)
    assert probs_s.mean().item() == pytest.approx(1 / n, rel=1e-5)
    assert probs_t.mean().item() == pytest.approx(1 / n, rel=1e-5)
    z = (mem.z_student.item(), mem.z_teacher.item())
    assert min(z) > 0
    mem(_unit(4, 8) * 3, _unit(4, 8), torch.tensor([4, 5, 6, 7]))  # Z is fixed after the first batch
    assert (mem.z_student.item(), mem.z_teacher.item()) == z


def test_memory_init_range_and_update_keeps_rows_unit_norm() -> None:
    torch.manual_seed(0)
    mem = ContrastMemory(feat_dim=12, num_data=30, num_negatives=5)
    bound = 1 / math.sqrt(12 / 3)
    assert mem.memory_student.abs().max() <= bound and mem.memory_teacher.abs().max() <= bound
    before_s, before_t = mem.memory_student.clone(), mem.memory_teacher.clone()
    index = torch.tensor([3, 7, 20])
    emb_s, emb_t = _unit(3, 12), _unit(3, 12)
    mem(emb_s, emb_t, index)
    for bank, before, emb in ((mem.memory_student, before_s, emb_s), (mem.memory_teacher, before_t, emb_t)):
        torch.testing.assert_close(bank[index].norm(dim=1), torch.ones(3))
        expected = F.normalize(0.5 * before[index] + 0.5 * emb, dim=1)
        torch.testing.assert_close(bank[index], expected)
        others = torch.ones(30, dtype=torch.bool)
        others[index] = False
        assert torch.equal(bank[others], before[others])


def test_momentum_half_with_identical_vectors_leaves_row_unchanged() -> None:
    mem = ContrastMemory(feat_dim=4, num_data=10, num_negatives=3, momentum=0.5)
    v = F.normalize(torch.tensor([[1.0, -2.0, 0.5, 3.0]]), dim=1)
    mem.memory_student[6] = v[0]
    mem.memory_teacher[6] = v[0]
    mem.update(torch.tensor([6]), v, v)
    torch.testing.assert_close(mem.memory_student[6], v[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(mem.memory_teacher[6], v[0], rtol=0, atol=1e-7)


def test_eval_mode_does_not_update_the_bank() -> None:
    mem = ContrastMemory(feat_dim=4, num_data=10, num_negatives=3).eval()
    before = mem.memory_student.clone()
    mem(_unit(2, 4), _unit(2, 4), torch.tensor([0, 1]))
    assert torch.equal(mem.memory_student, before)


def test_banks_follow_to_and_z_survives_dtype_change() -> None:
    torch.manual_seed(0)
    crd = CRDLoss(4, 6, num_data=10, feat_dim=8, num_negatives=3)
    crd(torch.randn(2, 4), torch.randn(2, 6), torch.tensor([1, 2]))
    z = crd.memory.z_student.item()
    crd = crd.to(torch.float64)
    assert crd.memory.memory_student.dtype == crd.memory.memory_teacher.dtype == torch.float64
    assert crd.memory.z_student.item() == pytest.approx(z)
    loss = crd(torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64), torch.tensor([3, 4]))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


def test_fast_sampler_never_returns_the_positive_and_covers_the_others() -> None:
    torch.manual_seed(0)
    n, k = 5, 4000
    mem = ContrastMemory(feat_dim=4, num_data=n, num_negatives=k)
    index = torch.arange(n)
    idx = mem.sample(index)
    assert idx.shape == (n, k + 1) and torch.equal(idx[:, 0], index)
    for row in range(n):
        negatives = idx[row, 1:]
        assert not (negatives == row).any()
        counts = torch.bincount(negatives, minlength=n).float() / k
        others = torch.tensor([c for c in range(n) if c != row])
        assert counts[others].sub(0.25).abs().max() < 0.04  # uniform over the n-1 others


def test_exact_sampler_draws_without_replacement() -> None:
    torch.manual_seed(0)
    n = 20
    mem = ContrastMemory(feat_dim=4, num_data=n, num_negatives=n - 1, sampling="exact")
    idx = mem.sample(torch.tensor([0, 13, 19]))
    for row, pos in enumerate([0, 13, 19]):
        assert sorted(idx[row, 1:].tolist()) == [c for c in range(n) if c != pos]


def test_score_paths_agree_with_an_explicit_loop() -> None:
    torch.manual_seed(0)
    for n in (6, 40):  # 6 <= (K+1)*D uses the dense product, 40 the gathered rows
        bank, anchor = torch.randn(n, 3), torch.randn(2, 3)
        idx = torch.randint(0, n, (2, 2))
        expected = torch.tensor([[float(bank[idx[b, j]] @ anchor[b]) for j in range(2)] for b in range(2)])
        torch.testing.assert_close(ContrastMemory._dot(bank, idx, anchor), expected)


# --- CRD loss, independent formulation ------------------------------------------------------------


def test_crd_loss_matches_hand_computation_on_a_tiny_bank() -> None:
    """NCE written as logistic regression on log P − log(K·Pn), scores by explicit loops."""
    torch.manual_seed(0)
    n, d, k, tau = 6, 3, 2, 0.5
    crd = CRDLoss(student_dim=d, teacher_dim=d, num_data=n, feat_dim=d, num_negatives=k, temperature=tau)
    for head in (crd.embed_student, crd.embed_teacher):  # identity heads: g(f) = f / |f|
        head.linear.weight.data.copy_(torch.eye(d))
        head.linear.bias.data.zero_()
    bank_s = crd.memory.memory_student.clone()
    bank_t = crd.memory.memory_teacher.clone()
    f_s = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    f_t = torch.tensor([[0.0, 1.0, 1.0], [2.0, -1.0, 0.5]])
    index = torch.tensor([4, 1])
    contrast = torch.tensor([[4, 0, 2], [1, 5, 5]])
    loss = crd(f_s, f_t, index, contrast)

    def nce(anchors: torch.Tensor, bank: torch.Tensor) -> float:
        g = [v / math.sqrt(float(v @ v)) for v in anchors]
        scores = [[math.exp(float(bank[j] @ g[b]) / tau) for j in contrast[b].tolist()] for b in range(2)]
        z = sum(map(sum, scores)) / (2 * (k + 1)) * n
        log_noise = math.log(k / n)
        total = 0.0
        for row in scores:
            logits = [math.log(s / z) - log_noise for s in row]
            total += math.log(1 / (1 + math.exp(-logits[0])))  # log σ(x) for the positive
            total += sum(math.log(1 / (1 + math.exp(x))) for x in logits[1:])  # log(1 − σ(x))
        return -total / 2

    expected = nce(f_s, bank_t) + nce(f_t, bank_s)
    assert loss.item() == pytest.approx(expected, abs=1e-4)
    # the bank rows of the batch moved towards the new embeddings and stayed unit-norm
    torch.testing.assert_close(crd.memory.memory_student[4], F.normalize(0.5 * bank_s[4] + 0.5 * F.normalize(f_s[0], dim=0), dim=0))


# --- method, state and errors ---------------------------------------------------------------------


def _models(student: str = "cifar.resnet8", teacher: str = "cifar.resnet8") -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return create_model(student, num_classes=10), create_model(teacher, num_classes=10)


def _batch(index: torch.Tensor | None, n: int = 4) -> Batch:
    return Batch(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)), index)


def test_crd_heads_sized_from_pooled_widths() -> None:
    s, t = _models("cifar.resnet8", "cifar.resnet8x4")  # pooled 64 / 256
    method = build_method("crd", student=s, teachers=[t], num_samples=100, num_negatives=8)
    assert method.criterion.embed_student.linear.in_features == 64
    assert method.criterion.embed_teacher.linear.in_features == 256
    s, t = _models()  # pooled 64 / 64 like resnet20/resnet56: heads of 16,640 parameters
    method = build_method("crd", student=s, teachers=[t], num_samples=100, num_negatives=8)
    assert sum(p.numel() for p in method.parameters()) == 16_640


def test_crd_memory_in_state_dict_and_restored() -> None:
    s, t = _models()
    method = build_method("crd", student=s, teachers=[t], num_samples=20, num_negatives=5)
    distiller = Distiller(s, [t], method)
    distiller.forward_train(_batch(torch.tensor([0, 3, 9, 19])), StepInfo())
    state = method.state_dict()
    for key in ("memory_student", "memory_teacher", "z_student", "z_teacher"):
        assert f"criterion.memory.{key}" in state
    assert state["criterion.memory.z_student"].item() > 0
    assert state["criterion.memory.memory_student"].shape == (20, 128)
    fresh = build_method("crd", student=s, teachers=[t], num_samples=20, num_negatives=5)
    assert fresh.criterion.memory.z_student.item() == -1
    assert not torch.equal(fresh.criterion.memory.memory_teacher, method.criterion.memory.memory_teacher)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_crd_step_gradients_reach_student_and_both_heads_not_teacher() -> None:
    s, t = _models()
    method = build_method("crd", student=s, teachers=[t], num_samples=16, num_negatives=6)
    distiller = Distiller(s, [t], method).train()
    _, losses = distiller.forward_train(_batch(torch.tensor([2, 5, 11, 15])), StepInfo())
    assert set(losses) == {"ce", "crd"}
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert s.conv1.weight.grad is not None and s.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    assert not any(b.requires_grad for b in method.buffers())
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert all(id(p) in trainable for p in method.parameters())


def test_crd_kd_adds_the_kd_term() -> None:
    s, t = _models()
    method = build_method("crd_kd", student=s, teachers=[t], num_samples=16, num_negatives=6, sampling="exact")
    assert method.kd_weight == 1.0 and method.crd_weight == 0.8
    assert method.criterion.memory.sampling == "exact"
    _, losses = Distiller(s, [t], method).forward_train(_batch(torch.tensor([0, 1, 2, 3])), StepInfo())
    assert set(losses) == {"ce", "kd", "crd"}


def test_crd_errors_are_clear() -> None:
    s, t = _models()
    with pytest.raises(ConfigError, match="num_samples"):
        build_method("crd", student=s, teachers=[t])
    with pytest.raises(ConfigError, match="sampling"):
        build_method("crd", student=s, teachers=[t], num_samples=10, num_negatives=4, sampling="alias")
    with pytest.warns(UserWarning, match="using 9"):
        method = build_method("crd", student=s, teachers=[t], num_samples=10)
    assert method.criterion.memory.num_negatives == 9
    distiller = Distiller(s, [t], method)
    with pytest.raises(ConfigError, match="sample indices"):
        distiller.forward_train(_batch(None), StepInfo())
    with pytest.raises(ValueError, match=r"\[0, num_samples=10\)"):
        distiller.forward_train(_batch(torch.tensor([0, 1, 2, 10])), StepInfo())


def test_crd_two_forwards_then_one_backward() -> None:
    """The bank and Z updates of a later forward must not break the backward of an earlier one."""
    torch.manual_seed(0)
    crd = CRDLoss(4, 4, num_data=10, feat_dim=8, num_negatives=3)
    feats = torch.randn(2, 4, requires_grad=True)
    first = crd(feats, torch.randn(2, 4), torch.tensor([0, 1]))
    second = crd(feats, torch.randn(2, 4), torch.tensor([0, 2]))
    (first + second).backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
