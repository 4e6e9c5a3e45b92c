"""NGCF (Wang et al., SIGIR 2019): an alternative stage-1 encoder (``model.encoder: ngcf``), as ReXRec compared.

With ``E^(0)`` the trainable ``(U+I, D)`` embeddings and ``L = D^-1/2 A D^-1/2`` the normalised user-item adjacency
(the same matrix LightGCN propagates with), each layer ``l = 0 .. n-1`` computes::

    M      = L E^(l)
    E^(l+1) = LeakyReLU_0.2( (M + E^(l)) W1_l + b1_l  +  (M ⊙ E^(l)) W2_l + b2_l )

(the first term is the ``(L + I) E W1`` message, the second the element-wise interaction message), followed by
message dropout. The final embedding of a node is the concatenation ``[E^(0), n(E^(1)), ..., n(E^(n))]`` with
``n`` the row-wise L2 normalisation, so it is ``D * (num_layers + 1)`` wide: stage 2's ``graph_dim`` must say so
(64 * 5 = 320 for the default four layers). Training is BPR on these final embeddings, as for LightGCN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NGCF"]


class NGCF(nn.Module):
    """NGCF embeddings for ``num_users`` users and ``num_items`` items (same interface as ``LightGCN``).

    Args:
        num_users: Number of users ``U``.
        num_items: Number of items ``I``.
        dim: Width ``D`` of the layer-0 embeddings and of every layer.
        num_layers: Propagation layers ``n``.
        dropout: Message dropout after each layer (training only; the NGCF paper used 0.1).
        negative_slope: LeakyReLU slope.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int = 64,
        num_layers: int = 4,
        dropout: float = 0.0,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1 or dim < 1 or num_layers < 0:
            raise ValueError(f"invalid NGCF sizes: {num_users=}, {num_items=}, {dim=}, {num_layers=}")
        self.num_users, self.num_items = int(num_users), int(num_items)
        self.dim, self.num_layers = int(dim), int(num_layers)
        self.dropout, self.negative_slope = float(dropout), float(negative_slope)
        self.embedding = nn.Embedding(self.num_users + self.num_items, self.dim)
        self.w1 = nn.ModuleList(nn.Linear(self.dim, self.dim) for _ in range(self.num_layers))
        self.w2 = nn.ModuleList(nn.Linear(self.dim, self.dim) for _ in range(self.num_layers))
        self.reset_parameters()

    @property
    def num_nodes(self) -> int:
        return self.num_users + self.num_items

    @property
    def out_dim(self) -> int:
        """Width of the final embeddings: ``dim * (num_layers + 1)``."""
        return self.dim * (self.num_layers + 1)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.embedding.weight)
        for lin in [*self.w1, *self.w2]:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def propagate(self, adj: Tensor) -> Tensor:
        """Final ``(U+I, D*(n+1))`` embeddings for the normalised adjacency ``adj`` ``(U+I, U+I)`` (sparse or dense)."""
        if adj.shape != (self.num_nodes, self.num_nodes):
            raise ValueError(f"adjacency is {tuple(adj.shape)}, expected ({self.num_nodes}, {self.num_nodes})")
        e = self.embedding.weight
        outs = [e]
        for w1, w2 in zip(self.w1, self.w2):
            m = adj @ e  # (N, D)
            e = F.leaky_relu(w1(m + e) + w2(m * e), self.negative_slope)
            e = F.dropout(e, self.dropout, self.training)
            outs.append(F.normalize(e, p=2, dim=1))
        return torch.cat(outs, dim=1)

    def forward(self, adj: Tensor) -> tuple[Tensor, Tensor]:
        """``(user_emb (U, D'), item_emb (I, D'))``, ``D' = dim * (num_layers + 1)``."""
        out = self.propagate(adj)
        return out[: self.num_users], out[self.num_users :]

    def ego(self, nodes: Tensor) -> Tensor:
        """Layer-0 (trainable) embeddings of ``nodes`` (for the L2 penalty with ``reg_on: ego``)."""
        return self.embedding(nodes)

    @staticmethod
    def score(user_emb: Tensor, item_emb: Tensor) -> Tensor:
        """Inner-product scores ``(B, I)``."""
        return user_emb @ item_emb.T

    def extra_repr(self) -> str:
        return (
            f"num_users={self.num_users}, num_items={self.num_items}, dim={self.dim}, "
            f"num_layers={self.num_layers}, dropout={self.dropout}"
        )
