"""Callbacks that make ``--ckpt_path last`` end exactly where an uninterrupted run ends.

* :class:`RNGState` keeps the Python, NumPy and torch (CPU and CUDA) generator states of the training batches apart
  from validation and loader start-up, stores them in every checkpoint and restores them on resume, so dropout and the
  MoE gate noise draw the same numbers after a restart. Lightning restores the model, optimizers, schedulers, loop
  counters and (through the datamodule's resumable loader) the data position, but not the generators.
* :class:`PeriodicCheckpoint` writes ``last.ckpt`` every N optimizer steps or every T of training time (a
  ``ModelCheckpoint`` that keeps only ``last.ckpt``, in the run's checkpoint folder), so a killed job loses at most
  that much work.
* :class:`CheckpointCheck` checks a checkpoint before anything loads it: a truncated or corrupted file, weights of
  another model, or (for ``fit``) a resume into a changed configuration stop the run with one ``DataError`` line
  naming the file, before training starts and before any checkpoint is written.
* :class:`PreemptionCheckpoint` writes ``last.ckpt`` at the end of the current batch when the process receives
  SIGTERM (Lightning's own flag) or SIGUSR1, before Lightning stops the run: a preempted job loses no step.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from xrec_pl import run_layout
from xrec_pl.data.pickles import require_inside, torch_load_error
from xrec_pl.errors import DataError
from xrec_pl.lit.checkpoint import state_mismatch
from xrec_pl.models.decoding import DECODING_FIELDS


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
    """Keep the training batches' random stream apart from everything else, and store it in every checkpoint.

    The stream is captured at the end of every training batch and put back at the start of the next one, so whatever
    runs in between -- validation (``redrawn`` embeddings, metric generation), a new DataLoader iterator drawing its
    base seed, epoch-end hooks -- never shifts the dropout masks and gate noise of later batches. A checkpoint stores
    the stream as of its last finished batch; on resume it is put back at the first batch. An interrupted run and an
    uninterrupted one therefore draw the same numbers, wherever the checkpoint was taken (mid-epoch, at the end of an
    epoch before or after validation, on a preemption signal).

    Under DDP only rank zero's state is saved (Lightning writes checkpoints from rank zero); ``seed_everything`` gives
    every rank the same generators, so restoring rank zero's on all ranks continues the run as it was.
    """

    def __init__(self) -> None:
        self._stream: dict[str, Any] | None = None
        self._in_batch = False

    def state_dict(self) -> dict[str, Any]:
        # inside a batch (a checkpoint written from on_train_batch_end before ours ran) the live state is the one
        # at the end of this batch; between batches it is the state captured at the end of the last one
        if self._in_batch or self._stream is None:
            return {"rng": capture_rng()}
        return {"rng": self._stream}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stream = state_dict.get("rng")
        self._in_batch = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._stream is not None:
            restore_rng(self._stream)
        self._in_batch = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._stream = capture_rng()
        self._in_batch = False


class PreemptionCheckpoint(pl.Callback):
    """Write ``last.ckpt`` when a SIGTERM or SIGUSR1 arrives, at the end of the batch that is running.

    Args:
        filename: Checkpoint file name inside the checkpoint folder (``<run>/checkpoints``).
        stop_on_sigusr1: Stop the process right after saving on SIGUSR1 (exit status 138 = 128 + SIGUSR1); SIGTERM
            always stops (Lightning raises ``SIGTERMException`` after the batch).
    """

    def __init__(self, filename: str = run_layout.LAST_CKPT, stop_on_sigusr1: bool = True) -> None:
        self.filename = filename
        self.stop_on_sigusr1 = stop_on_sigusr1
        self._sigusr1 = False
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self._sigusr1 = True
        if callable(self._previous):
            self._previous(signum, frame)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed after Lightning's signal connector recorded the original handlers (it restores them at the end)
        if hasattr(signal, "SIGUSR1") and self._previous is None:
            try:
                self._previous = signal.signal(signal.SIGUSR1, self._handler)
            except ValueError:  # not the main thread: leave signals to the launcher
                self._previous = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._previous is not None and hasattr(signal, "SIGUSR1"):
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips the teardown hooks after an exception

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        folder = getattr(ckpt, "dirpath", None) or run_layout.checkpoints_dir(trainer.default_root_dir)
        return Path(folder) / self.filename

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        requested = bool(trainer.received_sigterm or self._sigusr1)
        if trainer.world_size > 1:  # a signal that reached one rank stops all of them at the same batch
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"[xrec-pl] preemption signal: saved {path} at step {trainer.global_step}")
        self._sigusr1 = False
        if self.stop_on_sigusr1 and not trainer.received_sigterm:
            # Stop now, as Lightning does on SIGTERM: a graceful stop would run the epoch-end hooks, whose checkpoints
            # (ModelCheckpoint's save_last) would record the interrupted epoch as finished.
            raise SIGTERMException(128 + int(signal.SIGUSR1))


class PeriodicCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps, or every ``train_time_interval`` of training.

    A ``ModelCheckpoint`` that keeps no top-k files, only ``last.ckpt`` (always the same file: no ``-v1`` versions),
    written into the folder of the run's other ``ModelCheckpoint`` (``<run>/checkpoints``) unless ``dirpath`` is given.
    Use it beside the monitored ``ModelCheckpoint`` (which keeps the best checkpoint): a crash or a kill then costs at
    most N steps or T of work, and ``--ckpt_path last`` continues from there. Lightning allows one trigger at a time.

    Args:
        every_n_train_steps: Save after every N optimizer steps (``None``: not by steps).
        train_time_interval: Save when this much training time has passed since the last save, e.g. ``"0:30:00"``
            (``None``: not by time). Checked at the end of every batch.
        dirpath: Checkpoint folder; ``None``: the folder of the trainer's first other ``ModelCheckpoint``, else
            ``<default_root_dir>/checkpoints``.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        train_time_interval: timedelta | str | None = None,
        dirpath: str | None = None,
    ) -> None:
        if isinstance(train_time_interval, str):
            train_time_interval = _parse_interval(train_time_interval)
        if every_n_train_steps is None and train_time_interval is None:
            raise ValueError("PeriodicCheckpoint needs every_n_train_steps or train_time_interval")
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            train_time_interval=train_time_interval,
            enable_version_counter=False,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            others = [c for c in trainer.checkpoint_callbacks if c is not self and getattr(c, "dirpath", None)]
            folder = others[0].dirpath if others else run_layout.checkpoints_dir(trainer.default_root_dir)
            self.dirpath = str(folder)
        super().setup(trainer, pl_module, stage)


def _parse_interval(text: str) -> timedelta:
    """``"H:MM:SS"`` (or ``"MM:SS"``, or plain seconds) as a ``timedelta``."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise ValueError(f"train_time_interval: expected H:MM:SS, got {text!r}") from None
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return timedelta(seconds=seconds)


# keys whose change does not alter the arithmetic of training: where files are, how evaluation/prediction run
RESUME_MAY_CHANGE = (
    "data_dir",
    "embeddings_path",
    "num_workers",
    "eval_batch_size",
    "eval_subset",
    "predict_split",
    "max_new_tokens",
    "predictions_file",
    "gradient_checkpointing",
    "llm_dtype",
    # the schedule's decay may change where it leaves the trained steps alone (the module checks that on resume)
    "decay_steps",
    # decoding: what validation and predict generate, not what trains
    "decoder",
    "generation_defaults",
    *DECODING_FIELDS,
)


class CheckpointCheck(pl.Callback):
    """Check a checkpoint before it is loaded; any problem is one ``DataError`` naming the file.

    Installed in ``setup`` (before Lightning loads anything) as a wrapper of the strategy's ``CheckpointIO``:

    * the file must load (a truncated or corrupted file otherwise fails deep inside ``torch.load``);
    * its ``state_dict`` must fit the module: for modules that load strictly, the same keys and shapes (a stage-1
      checkpoint into stage 2, or the reverse, is refused here); modules with their own validated loading
      (``ExplainerModule``: LLM identity, adapter type) check in ``on_load_checkpoint``;
    * for ``fit`` (a resume), the module's and the datamodule's hyperparameters must equal the stored ones, except
      ``allow_changed`` (paths, evaluation settings): resuming into another learning rate, batch size or seed would
      not continue the run that was interrupted.

    Nothing is written before these checks pass, so a failed start never replaces the previous ``last.ckpt``.

    Args:
        allow_changed: Hyperparameters that may differ on resume (default: :data:`RESUME_MAY_CHANGE`).
    """

    def __init__(self, allow_changed: Sequence[str] | None = None) -> None:
        self.allow_changed = tuple(RESUME_MAY_CHANGE if allow_changed is None else allow_changed)
        self._inner: CheckpointIO | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        inner = getattr(strategy, "checkpoint_io", None)
        if inner is None or isinstance(inner, _CheckedIO):
            return
        self._inner = inner
        strategy.checkpoint_io = _CheckedIO(inner, self, trainer, pl_module, stage)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._inner is not None and isinstance(trainer.strategy.checkpoint_io, _CheckedIO):
            trainer.strategy.checkpoint_io = self._inner
        self._inner = None

    def check(self, path: Any, checkpoint: Any, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Raise ``DataError`` if ``checkpoint`` (loaded from ``path``) cannot be used by this run."""
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
            raise DataError(f"{path}: not a Lightning checkpoint (no state_dict)")
        _check_checkpoint_paths(path, checkpoint, trainer)
        if getattr(pl_module, "strict_loading", True):
            problem = state_mismatch(checkpoint["state_dict"], pl_module.state_dict(), limit=3)
            if problem and problem.startswith("missing"):
                raise DataError(
                    f"{path}: weights of another model ({problem}); was it written by another stage or configuration?"
                )
            if problem:
                raise DataError(f"{path}: {problem}")
        if stage != "fit":
            return
        changes = _changed(
            checkpoint.get("hyper_parameters") or {}, dict(pl_module.hparams), "model", self.allow_changed
        )
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and checkpoint.get("datamodule_hyper_parameters") is not None:
            changes += _changed(checkpoint["datamodule_hyper_parameters"], dict(dm.hparams), "data", self.allow_changed)
        if changes:
            raise DataError(
                f"{path}: resuming into a changed config ({'; '.join(changes[:6])}"
                f"{'; ...' if len(changes) > 6 else ''}); restore these values or start a new run folder"
            )


class _CheckedIO(CheckpointIO):
    """Delegates to the strategy's own ``CheckpointIO``; ``load_checkpoint`` turns every failure into a DataError."""

    def __init__(
        self, inner: CheckpointIO, check: CheckpointCheck, trainer: pl.Trainer, module: pl.LightningModule, stage: str
    ) -> None:
        self.inner, self._check, self._trainer, self._module, self._stage = inner, check, trainer, module, stage

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, **kwargs: Any) -> dict[str, Any]:
        if not Path(path).is_file():
            raise DataError(f"{path}: checkpoint not found")
        kwargs["weights_only"] = True  # a checkpoint never runs code, whatever the caller asked for
        try:
            checkpoint = self.inner.load_checkpoint(path, map_location=map_location, **kwargs)
        except Exception as err:  # torch.load raises many types for damaged files (RuntimeError, EOFError, ...)
            raise torch_load_error(path, err) from None
        self._check.check(path, checkpoint, self._trainer, self._module, self._stage)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _changed(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str, allowed: Sequence[str]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        if key in allowed or key.startswith("_"):
            continue
        before, after = _plain(saved.get(key)), _plain(now.get(key))
        if before != after:
            out.append(f"{prefix}.{key}: {before!r} -> {after!r}")
    return out


def _check_checkpoint_paths(path: Any, checkpoint: Mapping[str, Any], trainer: pl.Trainer) -> None:
    """Refuse a checkpoint whose ``ModelCheckpoint`` state names files outside its own folder.

    When the stored ``dirpath`` is this run's checkpoint folder, Lightning restores ``best_model_path``,
    ``best_k_models`` and friends from the file, loads the best one at the end of the run and deletes the paths it
    replaces: an edited checkpoint could point either anywhere. (A run folder that was moved keeps its old
    ``dirpath``; Lightning then ignores those paths, and so does this check.)
    """
    mine = {Path(str(cb.dirpath)).resolve() for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not str(key).startswith("ModelCheckpoint") or not isinstance(state, Mapping):
            continue
        folder = state.get("dirpath")
        if not isinstance(folder, str) or Path(folder).resolve() not in mine:
            continue
        named = [state.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")]
        best_k = state.get("best_k_models") or {}
        named += list(best_k.keys()) if isinstance(best_k, Mapping) else [best_k]
        for name in (n for n in named if n):
            if not isinstance(name, str):
                raise DataError(f"{path}: malformed ModelCheckpoint state ({type(name).__name__} where a path belongs)")
            require_inside(name, folder, f"a file named by checkpoint {path}")
