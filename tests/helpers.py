"""Small helpers shared by the test modules."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def quiet_trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary, rooted in ``tmp_path``."""
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    return pl.Trainer(**{**defaults, **kwargs})
