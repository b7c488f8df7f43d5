"""Losses of the online methods (DML, OEKD, MCL, FFSD) and HKD, and the shared memory bank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdistill.losses import (
    ContrastMemory,
    ContrastSampler,
    GraphConv1Hop,
    MemoryBank,
    attention_map,
    diversity_loss,
    diversity_target,
    ensemble_logits,
    ffsd_warmup,
    hkd_losses,
    knn_graph,
    mcl_losses,
    mcl_okd_nce,
    memory_infonce,
    mutual_kl,
    normalized_adjacency,
    normalized_distance,
    oekd_loss,
    oekd_widths,
    supcon_matrix_loss,
)


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _softmax(z: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


# --- the shared memory bank and sampler -----------------------------------------------------------


def test_contrast_memory_state_dict_keys_unchanged_by_the_shared_bank() -> None:
    mem = ContrastMemory(feat_dim=4, num_data=10, num_negatives=3, labels=torch.arange(10) % 2)
    assert list(mem.state_dict()) == ["memory_student", "memory_teacher", "z_student", "z_teacher"]


@pytest.mark.parametrize("sampling", ["fast", "exact"])
def test_class_aware_sampler_draws_negatives_of_other_classes_only(sampling: str) -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2, 0])
    sampler = ContrastSampler(12, num_negatives=5, sampling=sampling, labels=labels)
    index = torch.tensor([0, 1, 2, 9])
    rows = sampler(index)
    assert rows.shape == (4, 6)
    assert torch.equal(rows[:, 0], index)
    assert (labels[rows[:, 1:]] != labels[index][:, None]).all()
    if sampling == "exact":  # without replacement within each row
        assert all(len(set(r.tolist())) == 5 for r in rows[:, 1:])
    many = sampler(torch.zeros(400, dtype=torch.long))[:, 1:]
    assert set(many.unique().tolist()) == {i for i in range(12) if labels[i] != 0}  # every candidate reachable


def test_sampler_relax_positive_is_a_same_class_sample_and_none_has_no_positive() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 2, 2])
    relax = ContrastSampler(8, 3, positive="relax", labels=labels)
    rows = relax(torch.arange(8).repeat(20))
    assert (labels[rows[:, 0]] == labels[torch.arange(8).repeat(20)]).all()
    assert set(rows[torch.arange(160) % 8 == 0, 0].tolist()) == {0, 2, 4}
    none = ContrastSampler(8, 3, positive="none", labels=labels)
    assert none(torch.tensor([6, 7])).shape == (2, 3)
    with pytest.raises(ValueError, match="labels"):
        ContrastSampler(8, 3, positive="relax")
    with pytest.raises(ValueError, match="single class"):
        ContrastSampler(4, 3, labels=torch.zeros(4, dtype=torch.long))


def test_memory_bank_momentum_update_of_named_banks() -> None:
    bank = MemoryBank(["a", "b", "c"], num_data=6, feat_dim=3, momentum=0.9)
    before = {n: bank.bank(n).clone() for n in "abc"}
    v = F.normalize(torch.randn(2, 3), dim=1)
    bank.update(torch.tensor([1, 4]), {"a": v, "c": -v})
    for row, i in enumerate([1, 4]):
        torch.testing.assert_close(bank.bank("a")[i], F.normalize(0.9 * before["a"][i] + 0.1 * v[row], dim=0))
        torch.testing.assert_close(bank.bank("c")[i], F.normalize(0.9 * before["c"][i] - 0.1 * v[row], dim=0))
    assert torch.equal(bank.bank("b"), before["b"])
    assert torch.equal(bank.bank("a")[[0, 2, 3, 5]], before["a"][[0, 2, 3, 5]])
    with pytest.raises(KeyError, match="banks"):
        bank.bank("d")


# --- DML --------------------------------------------------------------------------------------------


def test_mutual_kl_matches_hand_computation_and_peers_get_no_gradient() -> None:
    z = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 0.0]]
    logits = [torch.tensor([row], requires_grad=True) for row in z]
    terms = mutual_kl(logits, temperature=2.0)
    p = [_softmax(row, 2.0) for row in z]
    for i in range(3):
        expected = 4.0 * sum(_kl(p[j], p[i]) for j in range(3) if j != i) / 2
        assert terms[i].item() == pytest.approx(expected, rel=1e-5)
    terms[0].backward()
    assert logits[0].grad.abs().sum() > 0
    assert all(g is None or not g.any() for g in (logits[1].grad, logits[2].grad))
    with pytest.raises(ValueError, match="at least 2"):
        mutual_kl(logits[:1])


# --- OEKD (student ensemble) ------------------------------------------------------------------------


def test_oekd_width_schedule() -> None:
    assert oekd_widths([16, 32, 64], 5) == [[16, 32, 64], [12, 25, 51], [9, 19, 38], [6, 12, 25], [3, 6, 12]]
    assert oekd_widths([16, 32, 64], 2, num_blocks=1) == [[16, 32, 64], [16, 32, 32]]


def test_oekd_identical_students_have_zero_kd_and_ensemble_is_the_mean() -> None:
    z = torch.randn(4, 6)
    losses = oekd_loss([z, z.clone(), z.clone()], torch.tensor([0, 1, 2, 3]))
    torch.testing.assert_close(ensemble_logits([z, z, z]), z)
    assert losses["kd"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["ce"].item() == pytest.approx(0.7 * 3 * F.cross_entropy(z, torch.tensor([0, 1, 2, 3])).item(), rel=1e-5)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(ensemble_logits([a, b], torch.tensor([0.25, 0.75])), 0.25 * a + 0.75 * b)


def test_oekd_kd_term_by_hand_and_feature_gradient_routing() -> None:
    z1, z2 = [[2.0, 0.0]], [[0.0, 1.0]]
    logits = [torch.tensor(z1, requires_grad=True), torch.tensor(z2, requires_grad=True)]
    f_teacher = torch.randn(1, 4, 2, 2, requires_grad=True)
    f_student = torch.randn(1, 2, 2, 2, requires_grad=True)
    adapter = nn.Conv2d(2, 4, 1)
    losses = oekd_loss(logits, torch.tensor([0]), [[f_teacher], [f_student]], [[adapter]], temperature=2.0)
    pe = _softmax([1.0, 0.5], 2.0)
    expected_kd = 0.15 * 4.0 * (_kl(pe, _softmax(z1[0], 2.0)) + _kl(pe, _softmax(z2[0], 2.0)))
    assert losses["kd"].item() == pytest.approx(expected_kd, rel=1e-5)
    expected_feature = 0.15 * ((adapter(f_student) - f_teacher) ** 2).mean()
    assert losses["feature"].item() == pytest.approx(expected_feature.item(), rel=1e-5)
    losses["feature"].backward()
    assert f_teacher.grad is None  # the pseudo-teacher's maps are targets only
    assert f_student.grad.abs().sum() > 0 and adapter.weight.grad.abs().sum() > 0


# --- MCL ----------------------------------------------------------------------------------------------


def _supcon_by_hand(s: list[list[float]], y: list[int], diagonal_positive: bool = False) -> float:
    total, anchors = 0.0, 0
    for a in range(len(y)):
        others = [b for b in range(len(y)) if diagonal_positive or b != a]
        log_z = math.log(sum(math.exp(s[a][b]) for b in others))
        pos = [b for b in others if y[b] == y[a]]
        if pos:
            total += sum(s[a][b] - log_z for b in pos) / len(pos)
            anchors += 1
    return -total / anchors


def test_supcon_matrix_loss_by_hand_for_four_samples_two_classes() -> None:
    torch.manual_seed(0)
    s = torch.randn(4, 4)
    y = [0, 1, 0, 1]
    got = supcon_matrix_loss(s, torch.tensor(y))
    assert got.item() == pytest.approx(_supcon_by_hand(s.tolist(), y), rel=1e-5)
    got_diag = supcon_matrix_loss(s, torch.tensor(y), diagonal_positive=True)
    assert got_diag.item() == pytest.approx(_supcon_by_hand(s.tolist(), y, True), rel=1e-5)


def test_mcl_soft_terms_vanish_for_identical_networks_and_targets_are_detached() -> None:
    torch.manual_seed(0)
    e = F.normalize(torch.randn(6, 5), dim=1)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    same = mcl_losses([e, e.clone()], y)
    assert same["soft_vcl"].item() == pytest.approx(0.0, abs=1e-6)
    assert same["soft_icl"].item() == pytest.approx(0.0, abs=1e-6)
    e0 = F.normalize(torch.randn(6, 5), dim=1).requires_grad_()
    e1 = F.normalize(torch.randn(6, 5), dim=1).requires_grad_()
    mcl_losses([e0, e1], y)["soft_vcl"].backward()
    # only the term where network 1 is the student sends gradient to network 1
    e1b = e1.detach().clone().requires_grad_()
    from kdistill.losses import kd_loss

    kd_loss(e1b @ e1b.t() / 0.1, (e0 @ e0.t() / 0.1).detach(), 3.0).backward()
    torch.testing.assert_close(e1.grad, e1b.grad)


def test_mcl_terms_match_supcon_of_each_matrix() -> None:
    torch.manual_seed(1)
    e = [F.normalize(torch.randn(4, 3), dim=1) for _ in range(2)]
    y = torch.tensor([0, 1, 0, 1])
    losses = mcl_losses(e, y, temperature=0.5)
    vcl = sum(_supcon_by_hand((x @ x.t() / 0.5).tolist(), y.tolist()) for x in e)
    s01 = (e[0] @ e[1].t() / 0.5).tolist()
    s10 = (e[1] @ e[0].t() / 0.5).tolist()
    assert losses["vcl"].item() == pytest.approx(vcl, rel=1e-5)
    assert losses["icl"].item() == pytest.approx(_supcon_by_hand(s01, [0, 1, 0, 1]) + _supcon_by_hand(s10, [0, 1, 0, 1]), rel=1e-5)
    positive = mcl_losses(e, y, temperature=0.5, icl_same_instance_positive=True)["icl"]
    expected = _supcon_by_hand(s01, [0, 1, 0, 1], True) + _supcon_by_hand(s10, [0, 1, 0, 1], True)
    assert positive.item() == pytest.approx(expected, rel=1e-5)


def test_mcl_okd_nce_by_hand_over_both_directions() -> None:
    torch.manual_seed(0)
    n, d, k, tau = 6, 3, 2, 0.5
    mem = MemoryBank(["m0", "m1"], num_data=n, feat_dim=d)
    v = [F.normalize(torch.randn(2, d), dim=1) for _ in range(2)]
    idx = torch.tensor([[1, 3, 4], [2, 0, 5]])
    got = mcl_okd_nce(v, mem, idx, temperature=tau)
    expected = 0.0
    for bank, anchor in ((mem.m0, v[1]), (mem.m1, v[0])):
        scores = [[math.exp(float(bank[idx[b, j]] @ anchor[b]) / tau) for j in range(k + 1)] for b in range(2)]
        z = sum(map(sum, scores)) / (2 * (k + 1)) * n
        pn = k / n
        for row in scores:
            p = [s / z for s in row]
            expected -= (math.log(p[0] / (p[0] + pn + 1e-7)) + sum(math.log(pn / (q + pn + 1e-7)) for q in p[1:])) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


# --- HKD -----------------------------------------------------------------------------------------------


def test_knn_graph_has_k_edges_per_node_and_self_loops() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 5)
    a = knn_graph(logits, k=8)
    assert a.sum().item() == 8 * 12
    assert (a.sum(1) == 8).all() and (a.diagonal() == 1).all()
    # the neighbours are the nearest by cosine distance of the softmax outputs
    p = F.normalize(logits.softmax(1), dim=1)
    dist = 1 - p @ p.t()
    for i in range(12):
        chosen = dist[i][a[i].bool()].clone()
        chosen_others = dist[i][(a[i] == 0)]
        chosen[(torch.arange(12)[a[i].bool()] == i)] = -1
        assert chosen.max() <= chosen_others.min() + 1e-6


def test_graph_conv_is_theta0_h_plus_theta1_normalised_neighbour_sum() -> None:
    torch.manual_seed(0)
    h = torch.randn(4, 3)
    a = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.float)
    conv = GraphConv1Hop(3, 2)
    theta0, theta1 = conv.linear.weight[:, :3], conv.linear.weight[:, 3:]
    deg = a.sum(1)
    for i in range(4):
        agg = sum(a[i, j] / math.sqrt(deg[i] * deg[j]) * h[j] for j in range(4))
        expected = F.normalize(theta0 @ h[i] + theta1 @ agg + conv.linear.bias, dim=0)
        torch.testing.assert_close(conv(h, a)[i], expected)
    torch.testing.assert_close(normalized_adjacency(torch.ones(3, 3)), torch.full((3, 3), 1 / 3))


def test_memory_infonce_by_hand_and_positive_is_row_max_for_identical_embeddings() -> None:
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(5, 3), dim=1)
    anchor = F.normalize(torch.randn(2, 3), dim=1)
    pos = F.normalize(torch.randn(2, 3), dim=1)
    neg = torch.tensor([[0, 2], [3, 4]])
    expected = 0.0
    for b in range(2):
        logits = [float(anchor[b] @ pos[b]) / 0.1] + [float(anchor[b] @ bank[j]) / 0.1 for j in neg[b]]
        expected -= logits[0] - math.log(sum(math.exp(v) for v in logits))
    assert memory_infonce(anchor, pos, bank, neg, 0.1).item() == pytest.approx(expected / 2, rel=1e-5)
    # identical student/teacher embeddings stored in both banks: the positive scores highest
    emb = F.normalize(torch.randn(5, 3), dim=1)
    index = torch.arange(5)
    negatives = torch.stack([torch.tensor([j for j in range(5) if j != i]) for i in range(5)])
    ideal = hkd_losses(emb, emb, None, None, emb, emb, index, negatives)["individual"]
    shuffled = hkd_losses(emb, emb, None, None, emb, emb[[1, 2, 3, 4, 0]], index, negatives)["individual"]
    assert ideal < shuffled


def test_hkd_holistic_positive_is_detached() -> None:
    torch.manual_seed(0)
    b, d, n = 8, 4, 20
    ms, mt = (F.normalize(torch.randn(n, d), dim=1) for _ in range(2))
    hs, ht = (F.normalize(torch.randn(b, d), dim=1) for _ in range(2))
    gs = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
    gt = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
    index, neg = torch.arange(b), torch.randint(0, n, (b, 6))
    hkd_losses(hs, ht, gs, gt, ms, mt, index, neg)["holistic"].backward()
    gt2 = gt.detach().clone().requires_grad_()
    target_t = F.normalize(0.75 * ms[index] + 0.25 * gs.detach(), dim=1)
    memory_infonce(gt2, target_t, mt, neg, 0.07).backward()
    torch.testing.assert_close(gt.grad, gt2.grad)  # the student-anchored half sends nothing to g^T


# --- FFSD ---------------------------------------------------------------------------------------------


def test_diversity_target_for_six_positions() -> None:
    y = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2, 0.7]])
    c = y.norm().item()
    y_hat = (y / c)[0].tolist()
    target = diversity_target(y.view(1, 2, 3))[0].tolist()
    # k = 2: θ is the second smallest (0.2); 0.1 is kept, 0.2 becomes c/2, the rest c - ŷ
    assert target[0] == pytest.approx(y_hat[0])
    assert target[4] == pytest.approx(c / 2)
    for i in (1, 2, 3, 5):
        assert target[i] == pytest.approx(c - y_hat[i])
    a = torch.rand(1, 2, 3, requires_grad=True)
    prev = torch.rand(1, 2, 3, requires_grad=True)
    diversity_loss(a, prev).backward()
    assert prev.grad is None and a.grad.abs().sum() > 0


def test_ffsd_warmup_values() -> None:
    assert ffsd_warmup(10.0, 0) == pytest.approx(10 * math.exp(-5))
    assert ffsd_warmup(10.0, 1) == pytest.approx(10 * math.exp(-3.2))
    assert ffsd_warmup(10.0, 5) == 10.0 and ffsd_warmup(10.0, 6) == 10.0


def test_attention_map_and_normalised_distance_by_hand() -> None:
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # B=1, C=2, H=1, W=2
    torch.testing.assert_close(attention_map(f), torch.tensor([[[5.0, 2.0]]]))
    x, y = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    expected = ((0.6 - 1.0) ** 2 + (0.8 - 0.0) ** 2) / 2
    assert normalized_distance(x, y).item() == pytest.approx(expected)
