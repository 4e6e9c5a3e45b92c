"""``LogProgress``: Lightning's progress bar for log files — plain lines on stderr, never a carriage return.

A TQDM or Rich bar redraws one line with ``\\r`` (or only at the end when stderr is no terminal), so ``tail log`` of a
``nohup``/SLURM/``> log 2>&1`` run shows nothing for a whole epoch. This bar prints one line when a stage starts,
at most every ``every_s`` seconds while it runs, and when an epoch or loop ends::

    [xrec-pl] fit: epoch 2/3 step 19/38 (50%) | global step 57 | 0.0123 s/step | elapsed 0:00:00 | ETA 0:00:00 | ...

``xrec_pl.tools.stage_cli.XrecCLI`` puts it in place of Lightning's bar when stderr is not a terminal (see
:func:`xrec_pl.progress.log_progress_wanted`); it can also be listed in a config's ``trainer.callbacks``.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

PREFIX = "[xrec-pl]"
MAX_EVAL_METRICS = 8  # metrics of a finished validation/test shown on its line


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _number(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _total(batches: Any) -> float:
    """Batches of a loop over all its dataloaders (``inf`` for one of unknown length)."""
    if isinstance(batches, (list, tuple)):
        return float(sum(batches))
    return float(batches or 0)


def _count(total: float) -> str:
    return str(int(total)) if math.isfinite(total) else "?"


def _of(done: int, total: float, unit: str = "") -> str:
    unit = f" {unit}" if unit else ""
    if math.isfinite(total) and total > 0:
        return f"{done}/{int(total)}{unit} ({100.0 * done / total:.0f}%)"
    return f"{done}{unit}"


class _Loop:
    """Clock and batch counter of one running loop (an epoch of training, a validation, a test or a predict run).

    ``base``: batches already done when the clock started (an epoch resumed in its middle); rate and ETA count
    only the batches run since.
    """

    def __init__(self, name: str, total: float, base: int = 0) -> None:
        self.name = name
        self.total = total
        self.base = base
        self.done = base
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def rate(self, unit: str = "step") -> str:
        """Seconds per step (or other ``unit``) so far (``-`` before the first)."""
        unit = unit.rstrip("s")
        run = self.done - self.base
        return f"{self.elapsed() / run:.3g} s/{unit}" if run > 0 else f"- s/{unit}"

    def eta(self) -> str:
        run = self.done - self.base
        if run <= 0 or not math.isfinite(self.total):
            return "ETA ?"
        return f"ETA {_hms(self.elapsed() / run * max(self.total - self.done, 0))}"


class LogProgress(ProgressBar):
    """Progress as plain stderr lines (rank zero only): stage, epoch, step, rate, elapsed time, ETA, metrics.

    Args:
        every_s: at most one periodic line per this many seconds (``0``: every step). Start and end lines of each
            stage, epoch and validation are always printed.
        stream: where the lines go (default: ``sys.stderr`` as it is when each line is written).
    """

    def __init__(self, every_s: float = 60.0, stream: Any = None) -> None:
        super().__init__()
        if not every_s >= 0:
            raise ValueError(f"every_s must be >= 0, got {every_s}")
        self.every_s = float(every_s)
        self.stream = stream
        self.enabled = True
        self._last = time.monotonic()
        self._stage_start = time.monotonic()
        self._train: _Loop | None = None
        self._train_start = (time.monotonic(), 0)
        self._notes: dict[str, _Loop] = {}
        self._eval: _Loop | None = None

    # -- ProgressBar's contract -----------------------------------------------------------------------------
    def disable(self) -> None:
        """Print nothing (Lightning calls it on ranks other than zero and around the learning-rate finder)."""
        self.enabled = False

    def enable(self) -> None:
        """Print again after :meth:`disable`."""
        self.enabled = True

    # -- output ---------------------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        """Write one line (no ``\\r``) with the ``[xrec-pl]`` prefix and flush it, if enabled."""
        if not self.enabled:
            return
        stream = sys.stderr if self.stream is None else self.stream
        stream.write(f"{PREFIX} {text.replace(chr(13), ' ')}\n")
        stream.flush()
        self._last = time.monotonic()

    def _due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def note_progress(self, what: str, done: int, total: int | None = None, unit: str = "") -> None:
        """A line about work the loops do not count (e.g. generation in a validation callback).

        Printed at most every ``every_s`` seconds and always for the last item, with the rate and ETA since the
        call with ``done=0`` (or the first call). Callbacks find the bar as ``trainer.progress_bar_callback``.

        Args:
            what: what is being done (``"val generation"``).
            done: items done so far (``0`` when it starts).
            total: items in all (``None`` if unknown).
            unit: what an item is (``"records"``).
        """
        loop = self._notes.get(what)
        if loop is None or done < loop.done:
            loop = self._notes[what] = _Loop(what, float("inf") if total is None else float(total))
        loop.done = done
        last = total is not None and done >= total
        if (last or self._due()) and done > 0:
            self._line(
                f"{self._stage()}: {what} {_of(done, loop.total, unit)}",
                loop.rate(unit or "item"),
                f"elapsed {_hms(loop.elapsed())}",
                loop.eta(),
            )
        if last:
            del self._notes[what]

    def _stage(self) -> str:
        fn = self.trainer.state.fn
        return str(getattr(fn, "value", fn) or "run")

    def _epoch(self, trainer: pl.Trainer) -> str:
        max_epochs = trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return f"epoch {trainer.current_epoch + 1}"
        return f"epoch {trainer.current_epoch + 1}/{max_epochs}"

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str | None = None) -> str:
        """The progress-bar metrics (``prog_bar=True``: train loss, val loss); after an evaluation, its own metrics
        (``prefix``, e.g. ``val/``: the progress-bar ones first, up to 8)."""
        items = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        if prefix is not None:
            items = {k: v for k, v in items.items() if k.startswith(prefix)}
            own = sorted(
                k
                for k in trainer.callback_metrics
                if k.startswith(prefix) and k not in items and not k.endswith("_std")
            )
            items.update({k: trainer.callback_metrics[k] for k in own[: max(MAX_EVAL_METRICS - len(items), 0)]})
        return " ".join(f"{k}={_number(v)}" for k, v in items.items() if not isinstance(v, dict))

    def _line(self, *parts: str) -> None:
        self.write(" | ".join(p for p in parts if p))

    # -- training -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stage_start = time.monotonic()
        self._line(f"fit: start, {type(pl_module).__name__}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = (time.monotonic(), trainer.current_epoch)  # after a resume: the checkpoint's epoch
        steps = f", max {trainer.max_steps} steps" if trainer.max_steps and trainer.max_steps > 0 else ""
        self._line(
            f"fit: training from {self._epoch(trainer)}{steps}, {_count(_total(self.total_train_batches))} steps "
            f"per epoch",
            f"global step {trainer.global_step}",
        )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train = _Loop("train", _total(self.total_train_batches))

    def _train_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = self._train
        if loop is None:
            return
        self._line(
            f"fit: {self._epoch(trainer)} step {_of(loop.done, loop.total)}",
            f"global step {trainer.global_step}",
            loop.rate(),
            f"elapsed {_hms(loop.elapsed())}",
            loop.eta(),
            self._metrics(trainer, pl_module),
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._train is None:  # an epoch resumed in its middle: Lightning calls no on_train_epoch_start
            self._train = _Loop("train", _total(self.total_train_batches), base=batch_idx)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._train is None:
            return
        self._train.done = batch_idx + 1
        if self._due():
            self._train_line(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = self._train
        if loop is None:
            return
        self._line(
            f"fit: {self._epoch(trainer)} done, {loop.done}/{_count(loop.total)} steps",
            f"global step {trainer.global_step}",
            loop.rate(),
            f"epoch time {_hms(loop.elapsed())}",
            self._fit_eta(trainer),
            self._metrics(trainer, pl_module),
        )
        self._train = None

    def _fit_eta(self, trainer: pl.Trainer) -> str:
        """Time left for the remaining epochs at the mean epoch time (validations included) of this session."""
        started, first_epoch = self._train_start
        epochs_done = trainer.current_epoch + 1 - first_epoch
        if trainer.max_epochs is None or trainer.max_epochs < 0 or epochs_done <= 0:
            return ""
        left = max(trainer.max_epochs - trainer.current_epoch - 1, 0)
        return f"fit ETA {_hms((time.monotonic() - started) / epochs_done * left)}"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._line(
            f"fit: end after {trainer.current_epoch} epoch{'' if trainer.current_epoch == 1 else 's'}",
            f"global step {trainer.global_step}",
            f"elapsed {_hms(time.monotonic() - self._stage_start)}",
            self._metrics(trainer, pl_module),
        )

    # -- evaluation loops -----------------------------------------------------------------------------------
    def _eval_start(self, name: str, batches: Any, standalone: bool) -> None:
        if standalone:
            self._stage_start = time.monotonic()
        self._eval = _Loop(self._stage() if standalone else name, _total(batches))
        if standalone:
            self._line(f"{self._stage()}: start, {_count(self._eval.total)} batches")

    def _eval_label(self, loop: _Loop) -> str:
        """``test: batch ...`` for a stage's own loop, ``fit: validation batch ...`` for one inside ``fit``."""
        return self._stage() + ("" if loop.name == self._stage() else f": {loop.name}")

    def _eval_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = self._eval
        if loop is None:
            return
        loop.done += 1
        if self._due():
            self._line(
                f"{self._eval_label(loop)} batch {_of(loop.done, loop.total)}",
                loop.rate(),
                f"elapsed {_hms(loop.elapsed())}",
                loop.eta(),
            )

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str | None) -> None:
        loop = self._eval
        if loop is None:
            return
        where = f" ({self._epoch(trainer)})" if self._stage() == "fit" and not trainer.sanity_checking else ""
        self._line(
            f"{self._eval_label(loop)}{where} done, {loop.done} batches",
            f"elapsed {_hms(loop.elapsed())}",
            self._metrics(trainer, pl_module, prefix) if prefix is not None else "",
        )
        self._eval = None

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start("sanity check", trainer.num_sanity_val_batches, standalone=False)

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, prefix=None)  # its metrics are discarded

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_start("validation", trainer.num_val_batches, standalone=trainer.state.fn == "validate")

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self._eval_batch(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval_end(trainer, pl_module, prefix="val/")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start("test", trainer.num_test_batches, standalone=True)

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self._eval_batch(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, prefix="test/")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start("predict", trainer.num_predict_batches, standalone=True)

    def on_predict_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, *args: Any
    ) -> None:
        self._eval_batch(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, prefix=None)
