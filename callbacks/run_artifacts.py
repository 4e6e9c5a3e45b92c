"""Run-folder artifacts: ``metrics.json`` with the final metrics of every stage a run went through.

Scripts read results from this file instead of parsing logs. It is merged, not replaced: a ``fit`` followed by a
``test`` in the same folder leaves both the validation and the test metrics in it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from xrec_pl import run_layout
from xrec_pl.utils import dump_json


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


class MetricsJson(pl.Callback):
    """Write the final ``split/name`` metrics of a run into ``<run folder>/metrics.json``.

    Args:
        filename: File name inside ``trainer.default_root_dir``.
    """

    def __init__(self, filename: str = run_layout.METRICS) -> None:
        self.filename = filename

    def path(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.filename

    @rank_zero_only
    def _merge(self, trainer: pl.Trainer, stage: str) -> None:
        path = self.path(trainer)
        data: dict[str, Any] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                data = {}
        metrics = _scalars(trainer.callback_metrics)
        data.setdefault("metrics", {}).update(metrics)
        data.setdefault("stages", {})[stage] = {
            "metrics": metrics,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if stage == "fit":
            ckpt = trainer.checkpoint_callback
            if ckpt is not None and getattr(ckpt, "best_model_path", ""):
                data["best_checkpoint"] = ckpt.best_model_path
                if ckpt.best_model_score is not None:
                    data["best_score"] = float(ckpt.best_model_score)
                    data["monitor"] = ckpt.monitor
        dump_json(path, data)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge(trainer, "fit")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._merge(trainer, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._merge(trainer, "test")
