"""``learning_curve.png`` in the run folder at the end of ``fit``: train loss and val BERTScore-F1 vs records seen.

Reads the run's ``CSVLogger`` files (every ``version_*``, so a resumed run draws one continuous curve); the
validation BERTScore comes from :class:`callbacks.explanation_metrics.ExplanationMetricsCallback`, which logs
``val/bertscore_f1`` at every validation. Without a CSV logger the callback does nothing.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class LearningCurve(pl.Callback):
    """Plot the learning curve into ``<trainer.default_root_dir>/<filename>`` after ``fit``.

    Args:
        filename: PNG file name inside the run folder.
    """

    def __init__(self, filename: str = "learning_curve.png") -> None:
        self.filename = filename

    @staticmethod
    def records_per_step(trainer: pl.Trainer) -> int:
        """Training records per optimizer step: batch size x processes x gradient accumulation."""
        dm = getattr(trainer, "datamodule", None)
        batch = int(getattr(dm, "batch_size", 1) or 1)
        return batch * max(1, trainer.world_size) * max(1, int(trainer.accumulate_grad_batches))

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from xrec_pl.analysis.curve import plot_learning_curve

        csv_loggers = [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]
        if not csv_loggers:
            return
        logger = csv_loggers[0]
        logger.save()
        root = Path(logger.root_dir)  # <save_dir>/<name>: every version_* of this run
        out = plot_learning_curve(
            root,
            Path(trainer.default_root_dir) / self.filename,
            self.records_per_step(trainer),
            title=Path(trainer.default_root_dir).as_posix(),
        )
        if out is not None:
            rank_zero_info(f"wrote the learning curve to {out}")
