"""Graph utilities: adjacency vs a dense reference, item sets, negative sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xrec_pl.data.graph import ItemSets, NegativeSampler, normalized_adjacency, unique_interactions


def test_adjacency_matches_dense_on_5_nodes():
    # 2 users, 3 items -> 5 nodes; user 0: items 0, 1; user 1: item 1 (twice), 2
    pairs = np.array([[0, 0], [0, 1], [1, 1], [1, 2], [1, 1]])
    adj = normalized_adjacency(pairs, 2, 3, dtype=torch.float64)
    a = torch.zeros(5, 5, dtype=torch.float64)
    for u, i in [(0, 0), (0, 1), (1, 1), (1, 2)]:
        a[u, 2 + i] = a[2 + i, u] = 1
    d = a.sum(1).pow(-0.5)
    expected = torch.diag(d) @ a @ torch.diag(d)
    assert adj.layout == torch.sparse_csr and adj.col_indices().dtype == torch.int32
    torch.testing.assert_close(adj.to_dense(), expected)
    torch.testing.assert_close(adj.to_dense(), adj.to_dense().T)
    assert torch.diagonal(adj.to_dense()).abs().sum() == 0  # no self loops
    assert adj.to_dense()[0, 2] == pytest.approx(1 / np.sqrt(2 * 1))


def test_isolated_nodes_and_bad_ids():
    adj = normalized_adjacency(np.array([[0, 0]]), 3, 2)
    assert adj.to_dense()[1].abs().sum() == 0 and adj.to_dense()[0, 3] == 1
    with pytest.raises(ValueError, match="out of range"):
        unique_interactions(np.array([[0, 5]]), 3, 2)
    with pytest.raises(ValueError, match="shape"):
        unique_interactions(np.array([1, 2, 3]), 3, 2)


def test_item_sets_gather_and_contains():
    sets = ItemSets(np.array([[2, 4], [0, 1], [2, 0], [0, 3], [2, 4]]), 3, 5)
    row, item = sets.gather(torch.tensor([2, 1, 0, 2]))
    got = sorted(zip(row.tolist(), item.tolist()))
    assert got == [(0, 0), (0, 4), (2, 1), (2, 3), (3, 0), (3, 4)]
    assert sets.counts().tolist() == [2, 0, 2]
    assert sets.contains(np.array([0, 0, 1, 2]), np.array([1, 2, 1, 4])).tolist() == [True, False, False, True]


@pytest.fixture
def dense_positives():
    rng = np.random.default_rng(0)
    num_users, num_items = 50, 30
    # users with many positives (up to 29 of 30) make rejections frequent
    pairs = [(u, i) for u in range(num_users) for i in rng.choice(num_items, size=rng.integers(1, 30), replace=False)]
    return ItemSets(np.array(pairs), num_users, num_items), np.array(pairs)


def test_negatives_never_positive(dense_positives):
    sets, pairs = dense_positives
    sampler = NegativeSampler(sets, seed=3)
    users = np.repeat(pairs[:, 0], 20)
    positives = set(map(tuple, pairs.tolist()))
    for epoch in range(5):
        neg = sampler.sample(users, epoch)
        assert neg.min() >= 0 and neg.max() < sets.num_items
        assert not any((u, i) in positives for u, i in zip(users.tolist(), neg.tolist()))


def test_negatives_deterministic_per_seed_epoch(dense_positives):
    sets, pairs = dense_positives
    users = pairs[:, 0]
    a, b = NegativeSampler(sets, seed=1), NegativeSampler(sets, seed=1)
    np.testing.assert_array_equal(a.sample(users, 4), b.sample(users, 4))
    assert not np.array_equal(a.sample(users, 4), a.sample(users, 5))
    assert not np.array_equal(a.sample(users, 4), NegativeSampler(sets, seed=2).sample(users, 4))


def test_negatives_cover_all_non_positives():
    sets = ItemSets(np.array([[0, 0], [0, 2]]), 1, 4)
    neg = NegativeSampler(sets).sample(np.zeros(400, dtype=np.int64), 0)
    assert set(neg.tolist()) == {1, 3}
    with pytest.raises(ValueError, match="every item"):
        NegativeSampler(ItemSets(np.array([[0, 0], [0, 1]]), 1, 2))
