"""m-per-class training batches (``data.samples_per_class``): what in-batch MCL's supervised
contrastive terms need, every class in a batch with at least m samples."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kdistill.config import build_config
from kdistill.data import ClassBalancedBatchSampler, ImageTensors, make_loader
from kdistill.utils import ConfigError

# 7 classes of 5, 4, 3, 2, 1, 6 and 3 samples (odd sizes: groups are completed from the class itself)
LABELS = torch.tensor([c for c, n in enumerate([5, 4, 3, 2, 1, 6, 3]) for _ in range(n)])


def _batches(sampler: ClassBalancedBatchSampler, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("m", [2, 3])
def test_every_class_in_a_batch_has_at_least_m_samples(m: int) -> None:
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=2 * m, samples_per_class=m, seed=0)
    batches = _batches(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 2 * m
        counts = Counter(LABELS[batch].tolist())
        assert min(counts.values()) >= m, (batch, counts)


def test_an_epoch_covers_every_sample_and_pads_odd_classes_with_their_own() -> None:
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=2, samples_per_class=2, seed=0)
    # class sizes 5,4,3,2,1,6,3 make ceil(n/2) = 3+2+2+1+1+3+2 = 14 groups: 14 batches of one group each
    assert len(sampler) == 14
    seen = Counter(i for b in _batches(sampler) for i in b)
    assert set(seen) == set(range(len(LABELS)))
    assert sum(seen.values()) == 28
    assert seen[14] == 2  # class 4 has one sample: its group holds it twice


def test_epochs_reshuffle_and_the_seed_reproduces() -> None:
    a = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3)
    b = ClassBalancedBatchSampler(LABELS, 4, 2, seed=3)
    assert _batches(a, 0) == _batches(b, 0)
    assert _batches(a, 0) != _batches(a, 1)


def test_ranks_get_disjoint_groups_and_resume_skips_trained_batches() -> None:
    labels = torch.arange(40) % 5  # 8 per class: 20 groups of 2
    ranks = [ClassBalancedBatchSampler(labels, 4, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    per_rank = [_batches(s) for s in ranks]
    assert [len(p) for p in per_rank] == [5, 5] == [len(s) for s in ranks]
    flat = [sorted(i for b in p for i in b) for p in per_rank]
    assert not set(flat[0]) & set(flat[1]) and len(flat[0]) + len(flat[1]) == 40
    full = per_rank[0]
    ranks[0].set_epoch(0)
    ranks[0].resume(0, 2)
    assert list(ranks[0]) == full[2:]


def test_batch_size_must_be_a_multiple_of_m() -> None:
    with pytest.raises(ValueError, match="multiple of samples_per_class 4"):
        ClassBalancedBatchSampler(LABELS, 6, 4)


def test_config_key_builds_the_class_balanced_loader_and_is_checked() -> None:
    data = ImageTensors(torch.zeros(len(LABELS), 3, 4, 4, dtype=torch.uint8), LABELS)
    loader = make_loader(data, 4, True, seed=0, samples_per_class=2)
    assert isinstance(loader.sampler, ClassBalancedBatchSampler)
    for _, targets, _ in loader:
        assert min(Counter(targets.tolist()).values()) >= 2
    plain = make_loader(data, 4, True, seed=0)
    assert not isinstance(plain.sampler, ClassBalancedBatchSampler)
    assert build_config(None, ["data.samples_per_class=2"]).data.samples_per_class == 2
    with pytest.raises(ConfigError, match="data.samples_per_class"):
        build_config(None, ["data.samples_per_class=3", "data.batch_size=64"])
    with pytest.raises(ConfigError, match="data.samples_per_class"):
        build_config(None, ["data.samples_per_class=0"])
