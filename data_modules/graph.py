"""InteractionDataModule: the user-item graph of an XRec data folder for stage 1 (LightGCN)."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from xrec_pl.data.graph import ItemSets, NegativeSampler, normalized_adjacency
from xrec_pl.data.io import read_interactions, read_para_dict
from xrec_pl.data.sampler import ResumableDataLoader, ResumableSampler
from xrec_pl.errors import DataError

__all__ = ["InteractionDataModule", "TripleDataset", "UserDataset"]


def _identity(batch: Any) -> Any:
    return batch


class TripleDataset(Dataset):
    """``(user, positive item, negative item)`` per training interaction; negatives depend on ``(seed, epoch)``.

    Batched access (``__getitems__``) returns three ``(B,)`` int64 tensors, so a batch costs three gathers instead
    of ``B`` Python calls. Negatives for the whole epoch are drawn (vectorised) on ``set_epoch``, in whichever process
    reads the data, so workers agree without communicating.

    Args:
        pairs: ``(N, 2)`` training ``[user, item]`` rows.
        negatives: The sampler of non-positive items.
        resample: Draw new negatives each epoch (``True``) or keep epoch 0's for all epochs (XRec's behaviour).
    """

    def __init__(self, pairs: np.ndarray, negatives: NegativeSampler, resample: bool = True) -> None:
        self.users = torch.from_numpy(np.ascontiguousarray(pairs[:, 0]))
        self.items = torch.from_numpy(np.ascontiguousarray(pairs[:, 1]))
        self.negatives = negatives
        self.resample = resample
        self.epoch: int | None = None
        self.neg = torch.empty(0, dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch) if self.resample else 0
        if epoch != self.epoch:
            self.neg = torch.from_numpy(self.negatives.sample(self.users.numpy(), epoch))
            self.epoch = epoch

    def __len__(self) -> int:
        return self.users.numel()

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        if self.epoch is None:
            self.set_epoch(0)
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.users[idx], self.items[idx], self.neg[idx]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        u, p, n = self.__getitems__([index])
        return u[0], p[0], n[0]


class UserDataset(Dataset):
    """User ids to evaluate; batches are ``(B,)`` int64 tensors."""

    def __init__(self, users: Tensor) -> None:
        self.users = users

    def __len__(self) -> int:
        return self.users.numel()

    def __getitems__(self, indices: list[int]) -> Tensor:
        return self.users[torch.as_tensor(indices, dtype=torch.long)]

    def __getitem__(self, index: int) -> Tensor:
        return self.users[index]


class InteractionDataModule(pl.LightningDataModule):
    """Training triples, evaluation users and the normalised graph of an XRec folder.

    ``num_users`` / ``num_items`` are read from ``para_dict`` on first access (so the CLI can link them into the model
    before ``setup``). Training batches are ``(user, pos, neg)`` int64 triples, one per row of ``total_trn.csv``,
    shuffled per epoch from ``(seed, epoch)``, with negatives re-drawn every epoch from ``(seed, epoch)`` and never a
    training positive of the user; mid-epoch resume is exact (:class:`~xrec_pl.data.sampler.ResumableDataLoader`).
    Validation/test batches are ids of users with at least one validation/test item.

    Ranking support: ``train_items`` (alias ``train_items_csr``), ``val_items``, ``test_items`` are
    :class:`~xrec_pl.data.graph.ItemSets`; :meth:`known_items` gives what to mask for a split (train for ``val``;
    train + val for ``test``).

    Args:
        data_dir: XRec data folder (``para_dict.pickle``/``.json``, ``total_{trn,val,tst}.csv``).
        batch_size: Training triples per optimizer step (XRec: 1024).
        eval_batch_size: Users per validation/test batch.
        num_workers: DataLoader workers (0 is fastest here: batches are three tensor gathers).
        seed: Seed of the shuffling and the negatives.
        resample_negatives: Re-draw negatives every epoch; ``False`` keeps one draw for the whole run (XRec).
        negative_pool: ``"catalogue"`` (every item) or ``"train"`` (only items that occur in ``total_trn.csv``, as
            XRec draws them).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike = "data/amazon",
        batch_size: int = 1024,
        eval_batch_size: int = 2048,
        num_workers: int = 0,
        seed: int = 0,
        resample_negatives: bool = True,
        negative_pool: str = "catalogue",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hparams.data_dir = str(data_dir)  # a plain str keeps checkpoints loadable with weights_only=True
        self.data_dir = Path(data_dir)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.seed, self.resample_negatives = int(num_workers), int(seed), bool(resample_negatives)
        if negative_pool not in ("catalogue", "train"):
            raise ValueError(f"negative_pool must be 'catalogue' or 'train', got {negative_pool!r}")
        self.negative_pool = negative_pool
        self._adj: Tensor | None = None
        self._train: TripleDataset | None = None

    @cached_property
    def para_dict(self) -> dict:
        return read_para_dict(self.data_dir)

    @property
    def num_users(self) -> int:
        return int(self.para_dict["user_num"])

    @property
    def num_items(self) -> int:
        return int(self.para_dict["item_num"])

    def interactions(self, split: str) -> np.ndarray:
        """``(N, 2)`` ``[user, item]`` rows of ``total_{split}.csv`` (``split`` in trn/val/tst), cached."""
        cache = self.__dict__.setdefault("_interactions", {})
        if split not in cache:
            cache[split] = read_interactions(self.data_dir, split, self.num_users, self.num_items)
        return cache[split]

    @cached_property
    def train_items(self) -> ItemSets:
        return ItemSets(self.interactions("trn"), self.num_users, self.num_items)

    @property
    def train_items_csr(self) -> ItemSets:
        return self.train_items

    @cached_property
    def val_items(self) -> ItemSets:
        return ItemSets(self.interactions("val"), self.num_users, self.num_items)

    @cached_property
    def test_items(self) -> ItemSets:
        return ItemSets(self.interactions("tst"), self.num_users, self.num_items)

    def targets(self, split: str) -> ItemSets:
        """Relevant items for ``split`` in ``{"val", "test"}``."""
        return {"val": self.val_items, "test": self.test_items}[split]

    def known_items(self, split: str) -> list[ItemSets]:
        """Item sets to mask when ranking for ``split``: train for val; train and val for test."""
        return {"val": [self.train_items], "test": [self.train_items, self.val_items]}[split]

    def adjacency(self) -> Tensor:
        """Normalised training adjacency ``(U+I, U+I)``, sparse CSR float32 (built once)."""
        if self._adj is None:
            self._adj = normalized_adjacency(self.interactions("trn"), self.num_users, self.num_items)
        return self._adj

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self._train is None:
            self.interactions("val")  # a broken validation file stops the run before training, not after an epoch
            full = torch.nonzero(self.train_items.counts() >= self.num_items).flatten()
            if full.numel():
                raise DataError(
                    f"{Path(self.data_dir) / 'total_trn.csv'}: user {int(full[0])} has interacted with all "
                    f"{self.num_items} items; BPR training needs a negative item for every user"
                )
            pool = self.interactions("trn")[:, 1] if self.negative_pool == "train" else None
            negatives = NegativeSampler(self.train_items, seed=self.seed, candidates=pool)
            self._train = TripleDataset(self.interactions("trn"), negatives, resample=self.resample_negatives)

    def train_dataloader(self) -> ResumableDataLoader:
        if self._train is None:
            self.setup("fit")
        return ResumableDataLoader(
            self._train,
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=_identity,
        )

    def _users_loader(self, split: str) -> ResumableDataLoader:
        users = UserDataset(torch.nonzero(self.targets(split).counts() > 0).flatten())
        # under DDP every user is evaluated by exactly one rank (no padding duplicates): the summed metrics are exact
        return ResumableDataLoader(
            users,
            sampler=ResumableSampler(users, shuffle=False, pad=False),
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_identity,
        )

    def val_dataloader(self) -> ResumableDataLoader:
        return self._users_loader("val")

    def test_dataloader(self) -> ResumableDataLoader:
        return self._users_loader("test")
