"""What every benchmark measures with: the machine it ran on, and a callback that times a training epoch."""

from __future__ import annotations

import platform
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


def machine_header() -> dict[str, Any]:
    """Describe the machine a benchmark ran on (reported beside every figure)."""
    import os

    import torch

    header: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        header["device"] = torch.cuda.get_device_name(0)
        header["gpu_count"] = torch.cuda.device_count()
    return header
