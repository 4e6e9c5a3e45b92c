"""The user-item graph of the training interactions: normalised adjacency, per-user item sets, negative sampling.

Node ids: users are ``0 .. U-1``, items are ``U .. U+I-1`` (item ``i`` is node ``U + i``). Everything here is
vectorised (numpy / torch); nothing loops over users or interactions in Python.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from xrec_pl.utils import epoch_seed

__all__ = [
    "ItemSets",
    "NegativeSampler",
    "normalized_adjacency",
    "unique_interactions",
]


def unique_interactions(interactions: np.ndarray | torch.Tensor, num_users: int, num_items: int) -> np.ndarray:
    """Sorted, de-duplicated ``(N, 2)`` int64 ``[user, item]`` pairs; ids are checked against the sizes."""
    pairs = np.asarray(interactions.cpu() if isinstance(interactions, torch.Tensor) else interactions, dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"interactions must have shape (N, 2), got {pairs.shape}")
    if pairs.size and (pairs.min() < 0 or pairs[:, 0].max() >= num_users or pairs[:, 1].max() >= num_items):
        raise ValueError(f"interaction ids out of range for {num_users} users and {num_items} items")
    keys = np.unique(pairs[:, 0] * num_items + pairs[:, 1])  # sorted by (user, item)
    return np.stack([keys // num_items, keys % num_items], axis=1)


def normalized_adjacency(
    interactions: np.ndarray | torch.Tensor, num_users: int, num_items: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Symmetric normalised adjacency ``D^-1/2 A D^-1/2`` of the bipartite graph, no self loops, as sparse CSR.

    ``A`` is the ``(U+I, U+I)`` 0/1 matrix with ``A[u, U+i] = A[U+i, u] = 1`` for every (de-duplicated) interaction;
    ``D`` its degree matrix. Entry ``(u, U+i)`` is ``1 / sqrt(deg(u) deg(i))``. The result is symmetric, which
    :mod:`xrec_pl.models.lightgcn` uses for a cheap backward pass.

    Args:
        interactions: ``(N, 2)`` ``[user, item]`` training pairs.
        num_users: ``U``.
        num_items: ``I``.
        dtype: Value dtype.

    Returns:
        ``torch.sparse_csr_tensor`` of shape ``(U+I, U+I)`` with ``2 * N_unique`` stored entries, sorted columns,
        int32 indices (int64 beyond 2^31 entries).
    """
    pairs = unique_interactions(interactions, num_users, num_items)
    n = num_users + num_items
    users, items = pairs[:, 0], pairs[:, 1] + num_users
    rows = np.concatenate([users, items])
    cols = np.concatenate([items, users])
    deg = np.bincount(rows, minlength=n).astype(np.float64)
    inv_sqrt = np.zeros(n)
    np.divide(1.0, np.sqrt(deg), out=inv_sqrt, where=deg > 0)
    order = np.lexsort((cols, rows))  # CSR order: by row, then column
    rows, cols = rows[order], cols[order]
    values = inv_sqrt[rows] * inv_sqrt[cols]
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=crow[1:])
    # int32 indices: MKL's CSR kernel converts int64 indices on every product (~2 extra copies per layer).
    index_dtype = torch.int32 if cols.size < 2**31 - 1 else torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(crow).to(index_dtype),
            torch.from_numpy(cols).to(index_dtype),
            torch.from_numpy(values).to(dtype),
            size=(n, n),
            check_invariants=False,  # built sorted and in range above
        )


class ItemSets:
    """Per-user item sets in CSR form (``indptr`` ``(U+1,)``, ``indices`` ``(nnz,)``, items sorted per user).

    Args:
        interactions: ``(N, 2)`` ``[user, item]`` pairs (duplicates are dropped).
        num_users: ``U``.
        num_items: ``I``.
    """

    def __init__(self, interactions: np.ndarray | torch.Tensor, num_users: int, num_items: int) -> None:
        pairs = unique_interactions(interactions, num_users, num_items)
        self.num_users, self.num_items = int(num_users), int(num_items)
        self.keys = pairs[:, 0] * num_items + pairs[:, 1]  # sorted int64 keys, for membership tests
        indptr = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(pairs[:, 0], minlength=num_users), out=indptr[1:])
        self.indptr = torch.from_numpy(indptr)
        self.indices = torch.from_numpy(pairs[:, 1].copy())

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def counts(self, users: torch.Tensor | None = None) -> torch.Tensor:
        """Number of items of each user in ``users`` (all users by default), shape ``(B,)``."""
        c = self.indptr[1:] - self.indptr[:-1]
        return c if users is None else c[users]

    def gather(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items of a batch of users as coordinates: ``(row, item)`` with ``row`` the position in ``users``.

        Args:
            users: ``(B,)`` int64 user ids.

        Returns:
            Two ``(M,)`` int64 tensors, ``M`` = total items of the batch.
        """
        users = users.cpu().long()
        starts, counts = self.indptr[users], self.counts(users)
        row = torch.repeat_interleave(torch.arange(users.numel()), counts)
        offsets = torch.cumsum(counts, 0) - counts  # (B,) start of each row within the output
        pos = torch.arange(int(counts.sum())) - offsets[row] + starts[row]
        return row, self.indices[pos]

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Boolean mask: is ``items[k]`` among the items of ``users[k]``? (binary search on sorted keys)."""
        keys = np.asarray(users, dtype=np.int64) * self.num_items + np.asarray(items, dtype=np.int64)
        if self.keys.size == 0:
            return np.zeros(keys.shape, dtype=bool)
        idx = np.searchsorted(self.keys, keys)
        return self.keys[np.minimum(idx, self.keys.size - 1)] == keys


class NegativeSampler:
    """Uniform negative items that are never a training positive of their user; deterministic per (seed, epoch).

    Rejection sampling, vectorised: draw all items at once, test membership against the sorted ``user * I + item``
    keys, redraw only the rejected ones, repeat until none is left (the expected number of rounds is tiny because
    users have few positives compared with the catalogue).

    Args:
        positives: The training ``ItemSets``.
        seed: Base seed.
        candidates: Items to draw from (``None``: the whole catalogue). XRec draws from the items that occur in
            the training interactions (``df["item"].unique()``), so an item never seen in training is never a negative.
    """

    def __init__(self, positives: ItemSets, seed: int = 0, candidates: np.ndarray | None = None) -> None:
        self.candidates = None if candidates is None else np.unique(np.asarray(candidates, dtype=np.int64))
        pool = positives.num_items if self.candidates is None else self.candidates.size
        if bool((positives.counts() >= pool).any()):
            what = "every item" if self.candidates is None else "every item of the negative pool"
            raise ValueError(f"a user has interacted with {what}; no negative item exists for them")
        self.positives = positives
        self.seed = int(seed)

    def _draw(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        if self.candidates is None:
            return rng.integers(0, self.positives.num_items, size=size, dtype=np.int64)
        return self.candidates[rng.integers(0, self.candidates.size, size=size, dtype=np.int64)]

    def sample(self, users: np.ndarray | torch.Tensor, epoch: int) -> np.ndarray:
        """One negative item per entry of ``users`` (``(N,)`` int64), a function of ``(seed, epoch, users)``."""
        users = np.asarray(users.cpu() if isinstance(users, torch.Tensor) else users, dtype=np.int64)
        rng = np.random.Generator(np.random.PCG64(epoch_seed(self.seed, epoch, stream=1)))
        items = self._draw(rng, users.shape)
        todo = np.flatnonzero(self.positives.contains(users, items))
        while todo.size:
            items[todo] = self._draw(rng, todo.size)
            todo = todo[self.positives.contains(users[todo], items[todo])]
        return items
