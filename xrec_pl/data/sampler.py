"""Deterministic, DDP-aware sampling with exact mid-epoch resume.

``ResumableSampler`` gives, for epoch ``e``, a permutation that depends only on ``(seed, e)``, split across
``num_replicas`` ranks like :class:`~torch.utils.data.distributed.DistributedSampler` (padded by wrapping around, or
truncated with ``drop_last``). ``ResumableDataLoader`` is a :class:`~torch.utils.data.DataLoader` that counts the
batches it has handed out and implements ``state_dict()`` / ``load_state_dict()``, so Lightning stores the position in
every checkpoint and a resumed run starts at the first batch that was not consumed.

How this fits Lightning 2.6 (read from ``loops/fit_loop.py``, ``loops/training_epoch_loop.py``, ``loops/fetchers.py``):

- ``FitLoop.on_save_checkpoint`` stores ``loader.state_dict()`` of every train loader that has the two methods.
  Checkpoints are written from ``on_train_batch_end`` / ``on_validation_end`` / ``on_train_epoch_end``, i.e. after the
  batch was consumed. For a sized loader the fetcher does not prefetch, so "batches yielded by our iterator" equals
  "batches consumed by ``training_step``"; with ``num_workers > 0`` the worker prefetch happens *inside* the torch
  iterator we wrap, so the count stays exact.
- On resume, ``FitLoop.setup_data`` calls ``load_state_dict`` then ``iter(loader)``, and only afterwards
  ``on_advance_start`` calls ``sampler.set_epoch(epoch)``. ``ResumableDataLoader.__iter__`` is therefore a generator:
  nothing (sampler order, worker start, ``dataset.set_epoch``) happens before the first ``next()``, which comes after
  ``set_epoch``. A stored position applies only to the epoch it was recorded in; when Lightning moves to the next epoch
  (checkpoint taken at the end of an epoch) the position is dropped.
- Sampler replacement: ``ResumableSampler`` subclasses ``DistributedSampler``, and Lightning never replaces a sampler
  that is already a ``DistributedSampler`` (``_requires_distributed_sampler``). So it works with the default
  ``Trainer(use_distributed_sampler=True)`` *and* with ``use_distributed_sampler=False``; rank and world size are read
  from ``torch.distributed`` when the loader is built (Lightning builds train loaders after the process group is up).
  This was chosen over "document ``use_distributed_sampler=False``" because it cannot be forgotten.

Datasets whose items depend on the epoch (e.g. negatives re-drawn every epoch) expose ``set_epoch(epoch)``; the loader
calls it at the start of every iteration, before workers are started. ``persistent_workers=True`` would keep stale
copies of such a dataset in the workers and is refused for them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from xrec_pl.utils import epoch_seed

__all__ = ["ResumableDataLoader", "ResumableSampler"]


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Permutation of ``range(n)`` per epoch from ``(seed, epoch)``, sharded over ranks, with a one-shot start offset.

    Args:
        data_source: The dataset (anything with ``len``) or its length.
        shuffle: Permute (``True``) or keep the natural order (``False``).
        seed: Base seed; epoch ``e`` uses ``epoch_seed(seed, e)``. Must be the same on every rank.
        num_replicas: World size; ``None`` reads it from ``torch.distributed`` (1 when not initialised).
        rank: This process' rank; ``None`` reads it from ``torch.distributed`` (0 when not initialised).
        drop_last: Drop the tail so that every rank gets ``floor(n / num_replicas)`` samples; otherwise pad by
            repeating the start of the permutation to ``ceil(n / num_replicas)`` (as ``DistributedSampler``).
        pad: With ``drop_last=False``: pad (above) or not; ``pad=False`` gives every sample to exactly one rank, in
            shards that may differ by one (evaluation: no sample counted twice).
    """

    def __init__(
        self,
        data_source: Sized | int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        # DistributedSampler.__init__ insists on an initialised process group; set its attributes ourselves instead.
        world, this_rank = _dist_info()
        self.num_replicas = world if num_replicas is None else int(num_replicas)
        self.rank = this_rank if rank is None else int(rank)
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"invalid rank {self.rank} for num_replicas {self.num_replicas}")
        self.dataset = data_source
        self.n = int(data_source) if isinstance(data_source, int) else len(data_source)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.pad = bool(pad)
        if self.drop_last:
            self.num_samples = self.n // self.num_replicas
        elif self.pad:
            self.num_samples = math.ceil(self.n / self.num_replicas)
        else:
            self.num_samples = len(range(self.rank, self.n, self.num_replicas))
        self.total_size = self.n if not (self.drop_last or self.pad) else self.num_samples * self.num_replicas
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` for the next iteration."""
        self.epoch = int(epoch)

    def start_at(self, position: int) -> None:
        """Make the next iteration (only) skip the first ``position`` indices of this rank's share."""
        self._start = max(0, int(position))

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        """This rank's full index order for ``epoch`` (default: the current one), shape ``(num_samples,)``."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        if self.total_size > self.n:  # pad by wrapping around (repeat as often as needed for tiny datasets)
            reps = math.ceil(self.total_size / max(self.n, 1))
            order = order.repeat(reps)
        order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self.indices()[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.n}, shuffle={self.shuffle}, seed={self.seed}, "
            f"num_replicas={self.num_replicas}, rank={self.rank}, drop_last={self.drop_last})"
        )


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within an epoch is saved and restored exactly.

    Takes the same arguments as :class:`~torch.utils.data.DataLoader`. Without an explicit ``sampler`` it builds a
    :class:`ResumableSampler` from ``shuffle``, ``seed`` and ``drop_last``. With a ``ResumableSampler`` skipping is done
    by index (no data is loaded for consumed batches); with any other deterministic sampler the consumed batches are
    drawn and discarded.

    Starting an iteration draws nothing from the global torch generator: the loader has its own, re-seeded from
    ``(seed, epoch)`` at every iteration (it gives the workers their base seed).

    ``state_dict()`` returns ``{"epoch", "batches_consumed", "batch_size", "num_replicas"}``; after
    ``load_state_dict(state)`` the next iteration of epoch ``state["epoch"]`` yields exactly the batches after the
    first ``batches_consumed``. ``len()`` is always the full epoch length (Lightning counts the skipped batches itself).

    Args:
        dataset: Map-style dataset. If it has ``set_epoch(epoch)``, it is called at the start of each iteration.
        batch_size: Samples per batch.
        shuffle: Used only to build the default sampler.
        sampler: A sampler; ``None`` builds a ``ResumableSampler``.
        seed: Used only to build the default sampler.
        drop_last: Drop the last incomplete batch (and, for the default sampler, the per-rank tail).
        **kwargs: Any other ``DataLoader`` argument (``num_workers``, ``collate_fn``, ``pin_memory``, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int | None = 1,
        shuffle: bool = False,
        sampler: Any = None,
        seed: int = 0,
        drop_last: bool = False,
        **kwargs: Any,
    ) -> None:
        if sampler is None and kwargs.get("batch_sampler") is None:
            sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        if kwargs.get("persistent_workers") and callable(getattr(dataset, "set_epoch", None)):
            raise ValueError(
                f"{type(dataset).__name__} changes with the epoch (set_epoch); persistent_workers=True would keep "
                "stale copies of it in the workers"
            )
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self._seed = int(getattr(sampler, "seed", seed))
        self._iter_epoch = 0
        self._consumed = 0
        self._pending: dict[str, int] | None = None

    def _epoch(self) -> int:
        for owner in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if owner is not None and hasattr(owner, "epoch"):
                return int(owner.epoch)
        return self._iter_epoch

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: runs at the first next(), i.e. after Lightning's set_epoch, even on resume.
        epoch = self._epoch()
        skip = 0
        if self._pending is not None and self._pending["epoch"] == epoch:
            skip = self._pending["batches_consumed"]
        self._pending = None
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)
        fast = isinstance(self.sampler, ResumableSampler) and self.batch_size is not None
        if fast and skip:
            self.sampler.start_at(skip * self.batch_size)
        self._iter_epoch, self._consumed = epoch, skip
        # The iterator draws the workers' base seed from this generator, not from the global one: worker seeds depend
        # on (seed, epoch) only, and starting an iterator leaves the training random stream alone.
        if self.generator is not None:
            self.generator.manual_seed(epoch_seed(self._seed, epoch, stream=7))
        iterator = super().__iter__()
        if not fast:
            for _ in range(skip):
                next(iterator, None)
        for batch in iterator:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Position of the current (or last) iteration: its epoch and how many batches were handed out."""
        epoch, consumed = self._iter_epoch, self._consumed
        if self._epoch() != epoch:  # set_epoch moved on and the new epoch has not started yet
            epoch, consumed = self._epoch(), 0
        return {
            "epoch": epoch,
            "batches_consumed": consumed,
            "batch_size": int(self.batch_size or 0),
            "num_replicas": int(getattr(self.sampler, "num_replicas", 1)),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume at the first batch not consumed in ``state_dict["epoch"]`` on the next iteration of that epoch."""
        epoch, consumed = int(state_dict["epoch"]), int(state_dict["batches_consumed"])
        same_layout = int(state_dict.get("batch_size", self.batch_size or 0)) == int(self.batch_size or 0) and int(
            state_dict.get("num_replicas", 1)
        ) == int(getattr(self.sampler, "num_replicas", 1))
        if not same_layout and consumed:
            warnings.warn(
                f"ResumableDataLoader: batch size or world size changed since the checkpoint ({state_dict}); "
                f"epoch {epoch} restarts from its first batch",
                stacklevel=2,
            )
            consumed = 0
        for owner in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if owner is not None and callable(getattr(owner, "set_epoch", None)):
                owner.set_epoch(epoch)
        self._iter_epoch, self._consumed = epoch, consumed
        self._pending = {"epoch": epoch, "batches_consumed": consumed}
