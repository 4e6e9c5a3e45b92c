"""``learning_curve.png`` in the run folder at the end of ``fit``: train loss and val BERTScore-F1 vs records seen.

Reads the run's ``CSVLogger`` files: Lightning writes ``<save_dir>/<name>/version_N/metrics.csv`` and a resumed run
starts a new version; :func:`read_curve` merges every version (a later version wins for a step it repeats), so the
curve of a run resumed with ``--ckpt_path last`` is continuous. The validation BERTScore comes from
:class:`callbacks.explanation_metrics.ExplanationMetricsCallback`, which logs ``val/bertscore_f1`` at every
validation. Records seen = ``(step + 1) * records_per_step`` (the last batch of an epoch may be smaller, so it is
exact up to that). Without a CSV logger the callback does nothing. For an existing run folder::

    python -c "from callbacks.learning_curve import plot_learning_curve as p; p('RUN/logs', 'RUN/curve.png', 8)"
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

__all__ = ["TRAIN_KEYS", "VAL_KEYS", "LearningCurve", "plot_learning_curve", "read_curve"]

TRAIN_KEYS = ("train/loss", "train/loss_step")
VAL_KEYS = ("val/loss", "val/bertscore_f1")


def _float(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _version_key(path: Path) -> int:
    name = path.parent.name
    return int(name.split("_", 1)[1]) if name.startswith("version_") and name[8:].isdigit() else -1


def read_curve(log_root: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` for the train and val keys, merged over every ``version_*/metrics.csv``.

    Args:
        log_root: a ``metrics.csv``, a ``version_N`` folder, or the logger's folder holding ``version_*``.
    """
    root = Path(log_root)
    if root.is_file():
        files = [root]
    else:
        files = sorted(root.glob("metrics.csv")) or sorted(root.glob("version_*/metrics.csv"), key=_version_key)
    series: dict[str, dict[int, float]] = {}
    for file in files:
        with file.open(newline="") as handle:
            for row in csv.DictReader(handle):
                step = _float(row.get("step"))
                if step is None:
                    continue
                for key in (*TRAIN_KEYS, *VAL_KEYS):
                    value = _float(row.get(key))
                    if value is not None:
                        series.setdefault(key, {})[int(step)] = value
    return {key: sorted(points.items()) for key, points in series.items()}


def plot_learning_curve(
    log_root: str | Path, out_png: str | Path, records_per_step: int, title: str | None = None
) -> Path | None:
    """Write a PNG: training loss (left axis) and ``val/bertscore_f1`` (right axis) against records seen.

    ``val/loss`` is drawn on the loss axis as well. Returns the path, or ``None`` when the logs hold no training loss.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xrec_pl.utils import atomic_path

    curve = read_curve(log_root)
    train = curve.get("train/loss") or curve.get("train/loss_step")
    if not train:
        return None

    def seen(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
        return [(s + 1) * records_per_step for s, _ in points], [v for _, v in points]

    fig, ax = plt.subplots(figsize=(7, 4))
    x, y = seen(train)
    ax.plot(x, y, color="tab:blue", alpha=0.5, lw=1, label="train/loss")
    if len(y) >= 5:
        k = max(2, len(y) // 20)
        smooth = [sum(y[max(0, i - k + 1) : i + 1]) / len(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))]
        ax.plot(x, smooth, color="tab:blue", lw=2, label=f"train/loss (mean of {k})")
    if curve.get("val/loss"):
        vx, vy = seen(curve["val/loss"])
        ax.plot(vx, vy, "o-", color="tab:orange", label="val/loss")
    ax.set_xlabel("training records seen")
    ax.set_ylabel("cross-entropy")
    handles, labels = ax.get_legend_handles_labels()
    if curve.get("val/bertscore_f1"):
        ax2: Any = ax.twinx()
        fx, fy = seen(curve["val/bertscore_f1"])
        ax2.plot(fx, fy, "s-", color="tab:green", label="val/bertscore_f1")
        ax2.set_ylabel("val BERTScore F1")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(title or "learning curve")
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


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
