"""W&B through ``configs/logger/wandb.yaml``, offline: the run folder holds ``wandb/offline-run-*`` with the resolved
config, the explanation-metrics sample table (JSON) and the checkpoint / predictions artifacts; ``disabled`` writes
nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.cli_runs import REPO, run, stage2_args

pytestmark = pytest.mark.integration


def _test_yaml(path: Path) -> Path:
    path.write_text(
        """
trainer:
  max_epochs: 1
  limit_train_batches: 2
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {monitor: val/loss, mode: min, save_last: true, enable_version_counter: false}
    - class_path: callbacks.explanation_metrics.ExplanationMetricsCallback
      init_args: {num_samples: 4, metrics: [usr], max_table_rows: 4}
    - class_path: callbacks.run_artifacts.MetricsJson
"""
    )
    return path


def _offline_runs(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


def test_offline_run_has_config_table_and_artifacts(synthetic_dir, tmp_path):
    root = tmp_path / "run"
    common = ["-c", str(REPO / "configs/logger/wandb.yaml"), "-c", str(_test_yaml(tmp_path / "t.yaml"))]
    args = stage2_args(synthetic_dir, root, *common, "--model.max_new_tokens=4")
    done = run("fit", args, WANDB_MODE="offline")
    assert done.returncode == 0, done.stderr[-3000:]
    (fit_run,) = _offline_runs(root)
    files = fit_run / "files"
    record = next(fit_run.glob("*.wandb")).read_bytes()  # offline: config and artifacts live in the run record
    # the resolved CLI config (XrecSaveConfig), as YAML text
    assert b"class_path: lightning.pytorch.callbacks.ModelCheckpoint" in record
    assert b"ExplainerModule" in record and b"llm: tiny-random" in record
    tables = list((files / "media" / "table").rglob("*.table.json"))
    assert tables, sorted(str(p.relative_to(fit_run)) for p in fit_run.rglob("*"))
    table = json.loads(tables[0].read_text())
    assert "prediction" in table["columns"] and 0 < len(table["data"]) <= 4
    assert b"run-checkpoint" in record and b"last.ckpt" in record  # the adapter checkpoint artifact

    ckpt = root / "checkpoints" / "last.ckpt"
    done = run("predict", [*args, "--ckpt_path", str(ckpt)], WANDB_MODE="offline")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "predictions.jsonl").is_file()
    predict_run = next(r for r in _offline_runs(root) if r != fit_run)
    record = next(predict_run.glob("*.wandb")).read_bytes()
    assert b"run-predictions" in record and b"predictions.jsonl" in record


def test_disabled_writes_nothing(tmp_path, monkeypatch):
    from xrec_pl.loggers import XrecWandbLogger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "predictions.jsonl").write_text("{}\n")
    logger = XrecWandbLogger(mode="disabled", save_dir=str(tmp_path))
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.log_hyperparams({"config": {"a": 1}})
    logger.finalize("success")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.jsonl"]
