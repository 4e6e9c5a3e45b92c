"""The one place for the names of the files and folders inside a run folder.

A stage run (``trainer.default_root_dir``)::

    checkpoints/last.ckpt       CHECKPOINTS_DIR / LAST_CKPT
    metrics.json                METRICS  (callbacks.run_artifacts.MetricsJson)
    embeddings.safetensors      EMBEDDINGS  (stage 1, callbacks.embedding_export.EmbeddingExport)
    predictions.jsonl           PREDICTIONS  (stage 2 predict)

A pipeline run (``xrec-pl pipeline --out_dir``) holds ``data/``, ``stage1/``, ``stage2/`` (stage runs as above),
``metrics.json``, ``per_sample.json`` and ``timings.json``; an experiment folder holds one pipeline-like tree per
arm and seed plus ``results.csv``, ``significance.csv``, ``report.md`` and ``report.png``.
"""

from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
METRICS = "metrics.json"
EMBEDDINGS = "embeddings.safetensors"
PREDICTIONS = "predictions.jsonl"
COMMUNITY_CHOICE = "community_choice.jsonl"

# pipeline folders and files
DATA_DIR = "data"
STAGE1_DIR = "stage1"
STAGE2_DIR = "stage2"
PER_SAMPLE = "per_sample.json"
TIMINGS = "timings.json"
WALL = "wall.json"  # experiment: wall time of one arm and seed

# experiment folder
RESULTS_CSV = "results.csv"
SIGNIFICANCE_CSV = "significance.csv"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"


def checkpoints_dir(run_dir: str | Path) -> Path:
    """The folder a stage run's checkpoints go to when the config names none."""
    return Path(run_dir) / CHECKPOINTS_DIR


def last_checkpoint(run_dir: str | Path) -> Path:
    """Where the resumable ``last.ckpt`` of a stage run lives."""
    return checkpoints_dir(run_dir) / LAST_CKPT
