"""LightGCN (He et al., SIGIR 2020) as used by XRec's stage 1.

.. math::
    \\mathbf{E}^{(l+1)} = \\hat{\\mathbf{A}} \\mathbf{E}^{(l)}, \\qquad
    \\mathbf{E} = \\sum_{l=0}^{L} \\alpha_l \\mathbf{E}^{(l)}, \\qquad
    \\hat{\\mathbf{A}} = \\mathbf{D}^{-1/2} \\mathbf{A} \\mathbf{D}^{-1/2}

over the ``U + I`` user and item nodes; ``alpha_l = 1`` (``combine="sum"``, XRec) or ``1 / (L + 1)``
(``combine="mean"``, the LightGCN paper and PyG). Scores are dot products of final user and item embeddings.

Speed (measured on the Amazon graph, 30,596 nodes, 577k stored entries, 2 CPU threads): ``Â`` is symmetric, so
the backward pass of ``Y = Â X`` is ``dX = Â dY``. A custom autograd function applies the same CSR matrix again
instead of letting autograd build the transpose, and saves nothing but ``Â`` (no per-layer activations): 4 layers
forward + backward took ~45 ms against ~120 ms with plain autograd through CSR and ~180 ms with COO
``torch.sparse.mm``; ``torch_geometric.utils.spmm`` (no ``torch_sparse`` installed) runs the plain CSR path.
Keep CSR indices int32 (:func:`xrec_pl.data.graph.normalized_adjacency` does): with int64 indices the MKL kernel
converts both index arrays on every call. Computing only the batch's rows in the last layer was tried and was
slower on CPU (the gather/scatter of the ~100k-entry row block costs more than the full product it saves).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LightGCN", "bpr_loss", "layer_weights"]


def layer_weights(num_layers: int, combine: str) -> list[float]:
    """``alpha_0 .. alpha_L`` for ``combine`` in ``{"sum", "mean"}``."""
    if combine == "sum":
        return [1.0] * (num_layers + 1)
    if combine == "mean":
        return [1.0 / (num_layers + 1)] * (num_layers + 1)
    raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")


class _SymmetricPropagation(torch.autograd.Function):
    """``sum_l alpha_l Â^l E`` for all nodes; backward uses ``Â^T = Â``."""

    @staticmethod
    def forward(ctx, adj: Tensor, weight: Tensor, alphas: tuple[float, ...]) -> Tensor:
        ctx.adj, ctx.alphas = adj, alphas
        h = weight
        out = weight * alphas[0]
        for a in alphas[1:]:
            h = adj @ h  # (N, D)
            out = out.add_(h, alpha=a)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # d/dE sum_l a_l Â^l E = sum_l a_l Â^l G (Â symmetric); Horner from the deepest layer.
        alphas = ctx.alphas
        acc = grad * alphas[-1]
        for a in reversed(alphas[:-1]):
            acc = (ctx.adj @ acc).add_(grad, alpha=a)
        return None, acc, None


def bpr_loss(
    user_emb: Tensor,
    pos_emb: Tensor,
    neg_emb: Tensor,
    reg_users: Tensor,
    reg_pos: Tensor,
    reg_neg: Tensor,
    weight_decay: float = 1e-6,
) -> Tensor:
    """Bayesian personalised ranking loss plus an L2 penalty, as in XRec's ``cal_loss``.

    ``mean_b softplus(<u_b, n_b> - <u_b, p_b>) + weight_decay * (||R_u||^2 + ||R_p||^2 + ||R_n||^2)``.
    ``softplus(-x)`` equals XRec's ``-log(sigmoid(x))`` without its overflow to ``inf``. The squared norms are sums
    over the batch (not means), as in XRec; which embeddings are penalised is the caller's choice (``reg_*``).

    Args:
        user_emb: ``(B, D)`` final user embeddings.
        pos_emb: ``(B, D)`` final embeddings of the positive items.
        neg_emb: ``(B, D)`` final embeddings of the negative items.
        reg_users: ``(B, D)`` embeddings to penalise for the users (e.g. layer 0).
        reg_pos: ``(B, D)`` likewise for the positive items.
        reg_neg: ``(B, D)`` likewise for the negative items.
        weight_decay: Penalty weight.

    Returns:
        Scalar loss.
    """
    diff = (user_emb * (neg_emb - pos_emb)).sum(-1)  # (B,) neg score - pos score
    loss = F.softplus(diff).mean()
    if weight_decay:
        loss = loss + weight_decay * (reg_users.pow(2).sum() + reg_pos.pow(2).sum() + reg_neg.pow(2).sum())
    return loss


class LightGCN(nn.Module):
    """LightGCN embeddings for ``num_users`` users and ``num_items`` items.

    Args:
        num_users: Number of users ``U``.
        num_items: Number of items ``I``.
        dim: Embedding size.
        num_layers: Propagation layers ``L``.
        combine: ``"sum"`` of the ``L + 1`` layer embeddings (XRec) or their ``"mean"`` (LightGCN paper, PyG).
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int = 64,
        num_layers: int = 4,
        combine: Literal["sum", "mean"] = "sum",
    ) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1 or dim < 1 or num_layers < 0:
            raise ValueError(f"invalid LightGCN sizes: {num_users=}, {num_items=}, {dim=}, {num_layers=}")
        self.num_users, self.num_items = int(num_users), int(num_items)
        self.dim, self.num_layers, self.combine = int(dim), int(num_layers), combine
        self.alphas = tuple(layer_weights(num_layers, combine))
        # One table: users are rows 0..U-1, items rows U..U+I-1 (the node order of the adjacency).
        self.embedding = nn.Embedding(self.num_users + self.num_items, self.dim)
        self.reset_parameters()

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    def reset_parameters(self) -> None:
        """Xavier-uniform init of the user and the item block separately (as XRec's two matrices)."""
        with torch.no_grad():
            nn.init.xavier_uniform_(self.embedding.weight[: self.num_users])
            nn.init.xavier_uniform_(self.embedding.weight[self.num_users :])

    def propagate(self, adj: Tensor) -> Tensor:
        """Final embeddings of all ``U + I`` nodes, ``(U+I, D)``, from the normalised adjacency ``adj``."""
        self._check_adj(adj)
        return _SymmetricPropagation.apply(adj, self.embedding.weight, self.alphas)

    def forward(self, adj: Tensor) -> tuple[Tensor, Tensor]:
        """Propagate and split: ``(user_emb (U, D), item_emb (I, D))``.

        Args:
            adj: Symmetric normalised adjacency ``(U+I, U+I)``, sparse CSR
                (:func:`xrec_pl.data.graph.normalized_adjacency`). Symmetry is assumed, not checked.
        """
        out = self.propagate(adj)
        return out[: self.num_users], out[self.num_users :]

    def ego(self, nodes: Tensor) -> Tensor:
        """Layer-0 (trainable) embeddings of node ids, ``(B, D)``."""
        return self.embedding(nodes)

    def score(self, user_emb: Tensor, item_emb: Tensor) -> Tensor:
        """All-pairs scores ``(B_u, B_i)`` of final user and item embeddings."""
        return user_emb @ item_emb.T

    @torch.no_grad()
    def recommend(self, adj: Tensor, users: Tensor, k: int, exclude: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Top-``k`` item ids per user, ``(B, k)``.

        Args:
            adj: Normalised adjacency.
            users: ``(B,)`` user ids.
            k: Items per user.
            exclude: Optional ``(row, item)`` coordinates (row = position in ``users``) never to recommend,
                e.g. :meth:`xrec_pl.data.graph.ItemSets.gather` of the training items.
        """
        user_emb, item_emb = self(adj)
        scores = self.score(user_emb[users], item_emb)  # (B, I)
        if exclude is not None:
            scores[exclude[0], exclude[1]] = float("-inf")
        return scores.topk(k, dim=1).indices

    def _check_adj(self, adj: Tensor) -> None:
        if adj.layout != torch.sparse_csr:
            raise ValueError(f"LightGCN expects a sparse CSR adjacency, got layout {adj.layout}")
        if adj.shape != (self.num_nodes, self.num_nodes):
            raise ValueError(f"adjacency shape {tuple(adj.shape)} != ({self.num_nodes}, {self.num_nodes})")

    def extra_repr(self) -> str:
        return (
            f"num_users={self.num_users}, num_items={self.num_items}, dim={self.dim}, "
            f"num_layers={self.num_layers}, combine={self.combine!r}"
        )
