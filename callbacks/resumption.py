"""Callbacks that make ``--ckpt_path last`` end exactly where an uninterrupted run ends.

* :class:`RNGState` stores the Python, NumPy and torch (CPU and CUDA) generator states in every checkpoint and
  restores them on resume, so dropout and the MoE gate noise draw the same numbers after a restart.
  Lightning restores the model, optimizers, schedulers, loop counters and (through the datamodule's resumable
  loader) the data position, but not the generators.
* :class:`PreemptionCheckpoint` writes ``last.ckpt`` at the end of the current batch when the process receives
  SIGTERM (Lightning's own flag) or SIGUSR1, before Lightning stops the run: a preempted job loses no step.
"""

from __future__ import annotations

import contextlib
import random
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info


def capture_rng() -> dict[str, Any]:
    """The state of every generator a training step may draw from."""
    # Only tensors and plain Python values: checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; generators missing from ``state`` are left alone."""
    if "python" in state:
        random.setstate(_as_python_state(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        keys = n["keys"].numpy().astype(np.uint32)
        np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    # a state that went through a checkpoint may come back with lists where random expects tuples
    version, internal, gauss = state
    return version, tuple(internal), gauss


class RNGState(pl.Callback):
    """Save and restore the random generators with each checkpoint (per rank)."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Restored at the first batch after a resume, not in load_state_dict: Lightning seeds, builds the loaders and
        # starts their iterators after loading callback states, and a DataLoader iterator draws from the global
        # generator when it starts. The stored state is the one right after the last finished batch.
        pending = getattr(self, "_pending", None)
        if pending is not None:
            restore_rng(pending)
            self._pending = None


class PreemptionCheckpoint(pl.Callback):
    """Write ``last.ckpt`` when a SIGTERM or SIGUSR1 arrives, at the end of the batch that is running.

    Args:
        filename: Checkpoint file name inside the checkpoint folder (``<run>/checkpoints``).
        stop_on_sigusr1: Stop training after saving on SIGUSR1 (SIGTERM always stops: Lightning raises).
    """

    def __init__(self, filename: str = "last.ckpt", stop_on_sigusr1: bool = True) -> None:
        self.filename = filename
        self.stop_on_sigusr1 = stop_on_sigusr1
        self._sigusr1 = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self._sigusr1 = True
        if callable(self._previous):
            self._previous(signum, frame)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and hasattr(signal, "SIGUSR1"):
            try:
                self._previous = signal.signal(signal.SIGUSR1, self._handler)
            except ValueError:  # not the main thread: leave signals to the launcher
                self._previous = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None and hasattr(signal, "SIGUSR1"):
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / self.filename

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if not (trainer.received_sigterm or self._sigusr1):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"[xrec-pl] preemption signal: saved {path} at step {trainer.global_step}")
        if self._sigusr1 and self.stop_on_sigusr1:
            trainer.should_stop = True
        self._sigusr1 = False
