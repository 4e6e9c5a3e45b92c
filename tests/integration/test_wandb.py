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


def _history(record_file: Path) -> list[dict[str, object]]:
    """The history rows (``wandb.log`` calls) of a W&B transaction log (``run-<id>.wandb``, LevelDB log format)."""
    from wandb.proto import wandb_internal_pb2

    data = record_file.read_bytes()
    block, pos, rows, chunk = 32768, 7, [], b""  # 7 bytes of file header (":W&B", magic, version)
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_killed_fit_resumes_into_the_same_run(synthetic_dir, tmp_path):
    """kill -9 a fit, resume with ``--ckpt_path last``: the same W&B run (id), its step metrics continuing."""
    import signal
    import time

    import torch

    from tests.integration.cli_runs import start, wait_for
    from xrec_pl.loggers import WANDB_RUN_ID_KEY

    root, marker = tmp_path / "run", tmp_path / "paused"
    every_step = tmp_path / "every.yaml"
    every_step.write_text(
        f"""
trainer:
  max_epochs: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: null, every_n_train_steps: 1, save_last: true, enable_version_counter: false}}
    - class_path: callbacks.resumption.RNGState
    - class_path: tests.integration.cli_runs.PauseAtStep
      init_args: {{step: 3, marker: {str(marker)!r}}}
"""
    )
    args = stage2_args(synthetic_dir, root, "-c", str(REPO / "configs/logger/wandb.yaml"), "-c", str(every_step))
    args.append("--model.max_new_tokens=2")
    # W&B flushes its transaction log every 15 s by default: once a second here, so the killed session's rows are
    # on disk (set it in a real job that may be killed; a kill between flushes loses only the unflushed rows)
    flush = {"WANDB_MODE": "offline", "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "1"}
    proc = start("fit", args, tmp_path / "killed.log", **flush)
    try:
        wait_for(marker, proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            "train/loss" in row for log in root.glob("wandb/offline-run-*/*.wandb") for row in _history(log)
        ):
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    (first,) = _offline_runs(root)
    run_id = first.name.rsplit("-", 1)[-1]
    last = root / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)[WANDB_RUN_ID_KEY] == run_id

    Path(f"{marker}.go").touch()  # the resumed run passes step 3 without pausing
    done = run("fit", [*args, "--ckpt_path", "last"], **flush)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = _offline_runs(root)
    assert len(runs) == 2 and {r.name.rsplit("-", 1)[-1] for r in runs} == {run_id}  # one run, two sessions
    assert torch.load(last, map_location="cpu", weights_only=True)[WANDB_RUN_ID_KEY] == run_id
    steps = []
    for session in runs:
        (log,) = session.glob(f"run-{run_id}.wandb")
        steps.append(sorted({int(r["trainer/global_step"]) for r in _history(log) if "train/loss" in r}))
    before, after = steps
    assert before and after, steps
    # 2 epochs x 5 steps, on from step 3. Before the kill, W&B may not have flushed its last second of history (a
    # SIGKILL on a loaded machine can lose step 2): what it kept is a prefix of 0..2, and nothing is logged twice.
    assert before == list(range(len(before))) and len(before) <= 3, steps
    assert after == list(range(3, 10)), steps


def test_project_entity_tags_group_reach_wandb_init(tmp_path):
    from xrec_pl.loggers import XrecWandbLogger

    logger = XrecWandbLogger(
        project="p",
        entity="e",
        tags=["a"],
        group="g",
        job_type="stage2",
        notes="n",
        mode="offline",
        save_dir=str(tmp_path),
    )
    init = logger._wandb_init
    assert (init["project"], init["entity"], init["tags"], init["group"], init["job_type"], init["notes"]) == (
        "p",
        "e",
        ["a"],
        "g",
        "stage2",
        "n",
    )
    assert init["resume"] == "allow" and not init.get("id")
    assert logger.use_run_id("abc") and init["id"] == "abc" and logger.version == "abc"
    assert not logger.use_run_id("other") and init["id"] == "abc"  # an id already set is kept
