"""Batching for the explanation data: padding collate (right for training, left for generation), length buckets."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from xrec_pl.data.prompts import IGNORE_INDEX
from xrec_pl.data.sampler import ResumableSampler
from xrec_pl.utils import check_choice, epoch_seed


class ListDataset(Dataset):
    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


class PadCollator:
    """Pad a list of encoded records into a batch.

    Args:
        pad_token_id: id written into padding positions of ``input_ids``.
        side: ``"right"`` (training, teacher-forced eval) or ``"left"`` (generation: the last prompt token of every
            row sits at the end, where generation continues).
    """

    def __init__(self, pad_token_id: int, side: Literal["left", "right"] = "right") -> None:
        check_choice("padding side", side, Literal["left", "right"])
        self.pad_token_id = int(pad_token_id)
        self.side = side

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch_size = len(items)
        length = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((batch_size, length), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)  # (B, T)
        has_labels = "labels" in items[0]
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        offsets = []
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            start = length - n if self.side == "left" else 0
            offsets.append(start)
            input_ids[row, start : start + n] = torch.tensor(it["input_ids"], dtype=torch.long)
            attention_mask[row, start : start + n] = 1
            if labels is not None:
                labels[row, start : start + n] = torch.tensor(it["labels"], dtype=torch.long)
        offset = torch.tensor(offsets, dtype=torch.long)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            batch["labels"] = labels
        batch["user_pos"] = torch.tensor([it["user_pos"] for it in items], dtype=torch.long) + offset  # (B,)
        batch["item_pos"] = torch.tensor([it["item_pos"] for it in items], dtype=torch.long) + offset  # (B,)
        for key in ("user_id", "item_id", "index"):
            batch[key] = torch.tensor([it[key] for it in items], dtype=torch.long)  # (B,)
        if "reference" in items[0]:
            batch["reference"] = [it["reference"] for it in items]
        return batch


class BucketSampler(ResumableSampler):
    """Length-bucketed, seeded, DDP-aware and resumable sample order.

    Per epoch: sort by length with random tie-breaking, cut into megabatches of ``batch_size * num_replicas``,
    shuffle the full megabatches from ``(seed, epoch)`` and keep the one partial megabatch last; rank ``r`` takes the
    ``r``-th contiguous slice of every megabatch. Consecutive groups of ``batch_size`` indices of this rank's order are
    therefore the buckets, so a ``DataLoader(batch_size=batch_size)`` over it yields them, and ``start_at`` skips whole
    batches on resume. Every rank gets the same number of samples (padded by repeating, like ``DistributedSampler``).

    Args:
        lengths: token length of every sample.
        batch_size: per-rank batch size.
        seed: base seed (same on every rank).
        num_replicas: world size; ``None`` reads ``torch.distributed``.
        rank: this rank; ``None`` reads ``torch.distributed``.
    """

    def __init__(
        self,
        lengths: list[int] | np.ndarray,
        batch_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        super().__init__(len(self.lengths), shuffle=True, seed=seed, num_replicas=num_replicas, rank=rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng(epoch_seed(self.seed, epoch))
        order = rng.permutation(self.n)
        if self.total_size > self.n:  # pad by repeating (the wrap-around of DistributedSampler)
            order = np.resize(order, self.total_size)
        order = order[np.argsort(self.lengths[order], kind="stable")]  # sorted by length, random among ties
        mega = self.batch_size * self.num_replicas
        n_full = self.total_size // mega
        full = order[: n_full * mega].reshape(n_full, self.num_replicas, self.batch_size)
        full = full[rng.permutation(n_full)]  # shuffle the buckets
        rest = order[n_full * mega :]  # (num_replicas * k,), k < batch_size
        k = len(rest) // self.num_replicas
        mine = np.concatenate([full[:, self.rank].reshape(-1), rest[self.rank * k : (self.rank + 1) * k]])
        return torch.from_numpy(mine.astype(np.int64))
