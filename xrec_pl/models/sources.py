"""Where stage 2's collaborative vectors come from: the ablation axis ``embedding_source`` as one module.

- ``"graph"``: the stage-1 user/item tables (XRec);
- ``"fixed"``: one constant vector for all users and one for all items;
- ``"random"``: a fixed random vector per id (seeded), sized once the dataset's sizes are known;
- ``"redrawn"``: fresh random vectors at every call.

Random vectors are ``N(0, s^2)``, ``s`` the standard deviation of the graph tables when they are given, else ``1``.
The tables are non-persistent buffers: they follow the module's device but never enter a checkpoint.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from xrec_pl.utils import check_choice, epoch_seed

EmbeddingSourceKind = Literal["graph", "fixed", "random", "redrawn"]


class EmbeddingSource(nn.Module):
    """Collaborative vectors ``(B, D)`` for the users and items of a batch.

    Args:
        kind: ``"graph"``, ``"fixed"``, ``"random"`` or ``"redrawn"``.
        dim: width ``D`` of the vectors.
        seed: seed of the fixed and random vectors.
        user: stage-1 user table ``(U, D)``; required for ``"graph"``, sets the scale of the random kinds.
        item: stage-1 item table ``(I, D)``, as ``user``.
        num_users: number of users (``"random"`` sizes its tables from it; ``None``: later, via :meth:`size`).
        num_items: number of items, as ``num_users``.
    """

    def __init__(
        self,
        kind: EmbeddingSourceKind,
        dim: int,
        seed: int = 0,
        user: Tensor | None = None,
        item: Tensor | None = None,
        num_users: int | None = None,
        num_items: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("embedding_source", kind, EmbeddingSourceKind)
        if kind == "graph" and (user is None or item is None):
            raise ValueError("embedding_source='graph' needs the stage-1 user and item tables")
        self.kind, self.dim, self.seed = kind, dim, seed
        self.scale = float(torch.cat([user.flatten(), item.flatten()]).std()) if user is not None else 1.0
        self.num_users, self.num_items = num_users, num_items
        if kind == "graph":
            self.num_users, self.num_items = user.shape[0], item.shape[0]
            self.register_buffer("user_table", user, persistent=False)  # (U, D)
            self.register_buffer("item_table", item, persistent=False)  # (I, D)
        elif kind == "fixed":
            self.register_buffer("user_table", self._draw(1, stream=1), persistent=False)  # (1, D)
            self.register_buffer("item_table", self._draw(1, stream=2), persistent=False)  # (1, D)
        else:  # random: sized now or in size(); redrawn: nothing stored
            self.register_buffer("user_table", None, persistent=False)
            self.register_buffer("item_table", None, persistent=False)
            self.size(num_users, num_items)

    def _draw(self, rows: int, stream: int) -> Tensor:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, 0, stream=stream))
        return torch.randn(rows, self.dim, generator=g) * self.scale

    def size(self, num_users: int | None, num_items: int | None, device: torch.device | None = None) -> None:
        """Record the dataset's sizes; ``"random"`` draws its tables (once) when both are known."""
        self.num_users = self.num_users if num_users is None else num_users
        self.num_items = self.num_items if num_items is None else num_items
        if self.kind != "random" or self.num_users is None or self.num_items is None or self.user_table is not None:
            return
        self.register_buffer("user_table", self._draw(self.num_users, stream=3).to(device), persistent=False)
        self.register_buffer("item_table", self._draw(self.num_items, stream=4).to(device), persistent=False)

    def forward(self, user_id: Tensor, item_id: Tensor) -> tuple[Tensor, Tensor]:
        """``(user vectors (B, D), item vectors (B, D))`` for ids ``(B,)``."""
        if self.kind == "redrawn":
            shape = (user_id.shape[0], self.dim)
            draw = [torch.randn(shape, device=user_id.device) * self.scale for _ in range(2)]
            return draw[0], draw[1]
        if self.user_table is None:
            raise ValueError("embedding_source='random' needs num_users/num_items (set them or use a DataModule)")
        if self.kind == "fixed":
            return self.user_table.expand(user_id.shape[0], -1), self.item_table.expand(item_id.shape[0], -1)
        return self.user_table[user_id], self.item_table[item_id]

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, dim={self.dim}, num_users={self.num_users}, num_items={self.num_items}"
