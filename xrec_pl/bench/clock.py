"""A Lightning callback that times the training epoch of a benchmark run."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch


class EpochClock(pl.Callback):
    """Wall time of the (single) training epoch and the number of steps it ran.

    Args:
        sync_cuda: Synchronise CUDA before reading the clock at the end, so queued kernels are counted.
    """

    def __init__(self, sync_cuda: bool = False) -> None:
        self.sync_cuda = sync_cuda
        self.start = self.stop = 0.0
        self.steps = 0

    @property
    def seconds(self) -> float:
        return self.stop - self.start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.sync_cuda and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stop = time.perf_counter()
