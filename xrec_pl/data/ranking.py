"""Full-ranking top-K metrics per user: Recall, NDCG, Precision, MRR.

Every user is ranked against the whole catalogue. Items the user is known to have already (the training items
for validation; training *and* validation items for test, since both were observed before the test period) are
masked with ``-inf`` before ``topk``, so they can neither occupy a slot nor count as hits. This differs from the
XRec reference, which scores one row per interaction and masks nothing; its numbers are not comparable with these.

Definitions for one user with relevant set ``T`` and top-K list ``r_1 .. r_K``:

- ``recall@K = |T ∩ top-K| / |T|``
- ``precision@K = |T ∩ top-K| / K``
- ``ndcg@K = sum_{j: r_j in T} 1/log2(j+1) / sum_{j=1}^{min(K, |T|)} 1/log2(j+1)``
- ``mrr@K = 1 / j*`` for the first ``j*`` with ``r_j in T``, 0 if none in the top K.

With ``mrr="sum"`` (XRec's definition, ``encoder/utils/metrics.py``) ``mrr@K = sum_{j: r_j in T} 1/j``: every hit in the
top K adds its reciprocal rank, so it can exceed 1. The reference's protocol (``eval_protocol: xrec`` of
:class:`~xrec_pl.lit.recommender.LightGCNModule`) also masks nothing and averages over interactions, not users.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["METRICS", "mask_items", "rank_metrics", "topk_metrics"]

METRICS = ("recall", "ndcg", "precision", "mrr")


def mask_items(scores: Tensor, exclude: tuple[Tensor, Tensor] | None) -> Tensor:
    """Set ``scores[row, item] = -inf`` for every ``(row, item)`` pair in ``exclude`` (in place); returns ``scores``."""
    if exclude is not None and exclude[0].numel():
        scores[exclude[0].to(scores.device), exclude[1].to(scores.device)] = float("-inf")
    return scores


def topk_metrics(hits: Tensor, num_relevant: Tensor, ks: Sequence[int], mrr: str = "first") -> dict[str, Tensor]:
    """Metrics from a hit matrix.

    Args:
        hits: ``(B, Kmax)`` bool/0-1, ``hits[b, j]`` = the item at rank ``j+1`` is relevant for user ``b``.
        num_relevant: ``(B,)`` size of each user's relevant set (users with 0 get 0 for every metric).
        ks: Cut-offs, each ``<= Kmax``.
        mrr: ``"first"`` (reciprocal rank of the first hit) or ``"sum"`` (XRec: the sum over all hits).

    Returns:
        ``{"recall@K": (B,), "ndcg@K": (B,), "precision@K": (B,), "mrr@K": (B,)}`` for each K.
    """
    hits = hits.float()
    b, kmax = hits.shape
    ranks = torch.arange(1, kmax + 1, device=hits.device, dtype=torch.float32)  # (Kmax,)
    discount = 1.0 / torch.log2(ranks + 1.0)
    n_rel = num_relevant.to(hits.device).float()
    out: dict[str, Tensor] = {}
    for k in ks:
        if k > kmax:
            raise ValueError(f"k={k} > number of ranked items {kmax}")
        h = hits[:, :k]  # (B, k)
        n_hit = h.sum(1)
        dcg = (h * discount[:k]).sum(1)
        ideal_len = n_rel.clamp(max=k).long()  # (B,)
        idcg = torch.cumsum(discount[:k], 0)[(ideal_len - 1).clamp(min=0)]
        first = torch.where(h.any(1), h.argmax(1).float() + 1.0, torch.full_like(n_hit, float("inf")))
        has = n_rel > 0
        out[f"recall@{k}"] = torch.where(has, n_hit / n_rel.clamp(min=1), torch.zeros_like(n_hit))
        out[f"ndcg@{k}"] = torch.where(has, dcg / idcg, torch.zeros_like(n_hit))
        out[f"precision@{k}"] = n_hit / k
        out[f"mrr@{k}"] = 1.0 / first if mrr == "first" else (h / ranks[:k]).sum(1)
    return out


def rank_metrics(
    scores: Tensor,
    targets: tuple[Tensor, Tensor],
    ks: Sequence[int] = (20, 40),
    exclude: tuple[Tensor, Tensor] | None = None,
    mrr: str = "first",
) -> dict[str, Tensor]:
    """Rank all items for a batch of users and score the top K against their relevant items.

    Args:
        scores: ``(B, I)`` scores; modified in place where ``exclude`` masks.
        targets: ``(row, item)`` coordinates of the relevant items (``row`` = position in the batch).
        ks: Cut-offs.
        exclude: ``(row, item)`` coordinates of items already known for the user (masked with ``-inf``).
        mrr: ``"first"`` or ``"sum"``, see :func:`topk_metrics`.

    Returns:
        Per-user metric tensors, see :func:`topk_metrics`.
    """
    b, num_items = scores.shape
    mask_items(scores, exclude)
    kmax = min(max(ks), num_items)
    top = scores.topk(kmax, dim=1).indices  # (B, Kmax)
    row, item = targets[0].to(scores.device), targets[1].to(scores.device)
    relevant = torch.zeros(b, num_items, dtype=torch.bool, device=scores.device)
    relevant[row, item] = True
    hits = relevant.gather(1, top)  # (B, Kmax)
    num_relevant = relevant.sum(1)  # duplicates in targets count once
    return topk_metrics(hits, num_relevant, ks, mrr=mrr)
