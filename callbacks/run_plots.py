"""``RunPlots``: when a ``fit`` ends, the run's plots from its CSV logs (``<run>/plots/*.png``), also to W&B."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


class RunPlots(pl.Callback):
    """Write :func:`xrec_pl.run_plots.plot_run`'s PNGs when ``fit`` ends (rank zero) and log them to W&B as images.

    Reads the logs of the run's ``CSVLogger`` (its ``log_dir``'s parent, so every version of a resumed run is
    merged); a run without a CSV logger gets no plots.
    """

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.plot(trainer)

    def plot(self, trainer: pl.Trainer) -> list[Path]:
        from lightning.pytorch.loggers import CSVLogger

        from xrec_pl.loggers import XrecWandbLogger
        from xrec_pl.run_plots import plot_run

        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if csv_logger is None:
            return []
        csv_logger.save()  # flush the rows still buffered
        written = plot_run(trainer.default_root_dir, Path(csv_logger.log_dir).parent)
        for logger in trainer.loggers:
            if isinstance(logger, XrecWandbLogger) and logger.resolved_mode != "disabled" and written:
                for path in written:
                    logger.log_image(key=f"plots/{path.stem}", images=[str(path)])
        return written
