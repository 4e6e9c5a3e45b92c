"""Per-run plots from the CSV logs: training loss, validation metrics per epoch, stage-1 Recall/NDCG curves.

Lightning's ``CSVLogger`` writes ``<run>/logs/version_N/metrics.csv``; a resumed run starts a new version, and
:func:`read_metrics` merges them (a later version wins for a step it repeats), so the plots of a resumed run are
continuous. :func:`plot_run` writes PNGs into ``<run>/plots/``; :class:`callbacks.run_plots.RunPlots` calls it when a
``fit`` ends and logs the images to W&B when W&B is on.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

__all__ = ["plot_run", "read_metrics"]

_RANKING = re.compile(r"^val/(recall|ndcg)@(\d+)$")


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _version(path: Path) -> int:
    name = path.parent.name
    return int(name[8:]) if name.startswith("version_") and name[8:].isdigit() else -1


def read_metrics(log_root: str | Path) -> dict[str, list[tuple[int, int, float]]]:
    """``{column: [(step, epoch, value), ...]}`` sorted by step, merged over every ``version_*/metrics.csv``.

    Args:
        log_root: a ``metrics.csv``, a ``version_N`` folder, or a folder holding ``version_*`` (e.g. ``<run>/logs``).
    """
    root = Path(log_root)
    files = (
        [root]
        if root.is_file()
        else sorted(root.glob("metrics.csv")) or sorted(root.glob("*/metrics.csv"), key=_version)
    )
    series: dict[str, dict[int, tuple[int, float]]] = {}
    for file in files:
        with file.open(newline="") as handle:
            for row in csv.DictReader(handle):
                step, epoch = _float(row.get("step")), _float(row.get("epoch"))
                if step is None:
                    continue
                for key, raw in row.items():
                    value = _float(raw)
                    if key not in ("step", "epoch") and value is not None:
                        series.setdefault(key, {})[int(step)] = (int(epoch) if epoch is not None else -1, value)
    return {k: [(s, e, v) for s, (e, v) in sorted(points.items())] for k, points in series.items()}


def _save(fig, out: Path) -> Path:
    from xrec_pl.utils import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def plot_run(run_dir: str | Path, log_root: str | Path | None = None) -> list[Path]:
    """Write the run's plots into ``<run_dir>/plots/``; the paths written (none when the logs hold nothing).

    * ``train_loss.png``: every ``train/*loss*`` column against the optimizer step;
    * ``val_metrics.png``: every other ``val/*`` metric against the epoch, one panel each (at most 12);
    * ``stage1_ranking.png`` (stage 1): ``val/recall@K`` and ``val/ndcg@K`` per epoch, one line per K.

    Args:
        run_dir: The run folder.
        log_root: Where the CSV logs are (default ``<run_dir>/logs``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    metrics = read_metrics(log_root or run / "logs")
    out_dir, written = run / "plots", []
    losses = sorted(k for k in metrics if k.startswith("train/") and "loss" in k)
    ranking = sorted(k for k in metrics if _RANKING.match(k))
    others = sorted(k for k in metrics if k.startswith("val/") and k not in ranking)[:12]
    if losses or ranking or others:
        out_dir.mkdir(parents=True, exist_ok=True)
    if losses:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in losses:
            ax.plot([s for s, _, _ in metrics[key]], [v for _, _, v in metrics[key]], label=key, lw=1)
        ax.set(xlabel="optimizer step", ylabel="loss", title=f"{run.name}: training loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out_dir / "train_loss.png"))
        plt.close(fig)
    if others:
        cols = min(3, len(others))
        rows = math.ceil(len(others) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, key in zip(axes.flat, others):
            ax.plot([e for _, e, _ in metrics[key]], [v for _, _, v in metrics[key]], "o-")
            ax.set(title=key, xlabel="epoch")
        for ax in list(axes.flat)[len(others) :]:
            ax.axis("off")
        fig.suptitle(f"{run.name}: validation metrics per epoch")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "val_metrics.png"))
        plt.close(fig)
    if ranking:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
        for ax, kind in zip(axes.flat, ("recall", "ndcg")):
            for key in (k for k in ranking if _RANKING.match(k).group(1) == kind):
                ax.plot([e for _, e, _ in metrics[key]], [v for _, _, v in metrics[key]], "o-", label=key[4:])
            ax.set(title=f"{kind.upper() if kind == 'ndcg' else 'Recall'}@K", xlabel="epoch")
            ax.legend(fontsize=8)
        fig.suptitle(f"{run.name}: stage-1 ranking metrics")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "stage1_ranking.png"))
        plt.close(fig)
    return written
