"""Ranking metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from xrec_pl.data.ranking import rank_metrics, topk_metrics


def _log2(x):
    return math.log2(x)


def test_hand_computed_single_user():
    # 6 items; scores rank items 5,4,3,2,1,0; relevant {4, 1, 0}; item 5 is a training item (masked)
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    targets = (torch.tensor([0, 0, 0]), torch.tensor([4, 1, 0]))
    m = rank_metrics(scores, targets, ks=(2, 4), exclude=(torch.tensor([0]), torch.tensor([5])))
    # ranked after masking: 4, 3, 2, 1, 0 -> hits at ranks 1 and 4
    assert m["recall@2"].item() == pytest.approx(1 / 3)
    assert m["precision@2"].item() == pytest.approx(1 / 2)
    assert m["mrr@2"].item() == pytest.approx(1.0)
    assert m["ndcg@2"].item() == pytest.approx(1.0 / (1 + 1 / _log2(3)))
    assert m["recall@4"].item() == pytest.approx(2 / 3)
    assert m["precision@4"].item() == pytest.approx(2 / 4)
    dcg = 1 + 1 / _log2(5)
    idcg = 1 + 1 / _log2(3) + 1 / _log2(4)
    assert m["ndcg@4"].item() == pytest.approx(dcg / idcg)


def test_first_hit_late_and_no_hit():
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0], [9.0, 8.0, 7.0, 6.0]])
    targets = (torch.tensor([0, 1]), torch.tensor([2, 3]))
    m = rank_metrics(scores, targets, ks=(3,))
    assert m["mrr@3"].tolist() == pytest.approx([1 / 3, 0.0])
    assert m["recall@3"].tolist() == pytest.approx([1.0, 0.0])
    assert m["ndcg@3"].tolist() == pytest.approx([1 / _log2(4), 0.0])
    assert m["precision@3"].tolist() == pytest.approx([1 / 3, 0.0])


def test_masked_item_never_counts_as_hit():
    scores = torch.tensor([[5.0, 1.0, 0.0]])
    m = rank_metrics(
        scores, (torch.tensor([0]), torch.tensor([0])), ks=(1,), exclude=(torch.tensor([0]), torch.tensor([0]))
    )
    assert m["recall@1"].item() == 0.0


def test_topk_metrics_ideal_dcg_caps_at_k():
    hits = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    m = topk_metrics(hits, torch.tensor([5]), ks=(2, 3))
    assert m["ndcg@2"].item() == pytest.approx(1.0)  # 2 hits in 2 slots is ideal even with 5 relevant
    assert m["recall@2"].item() == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="k=4"):
        topk_metrics(hits, torch.tensor([5]), ks=(4,))
