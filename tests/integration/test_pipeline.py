"""`xrec-pl pipeline` end to end on the tiny synthetic dataset with the tiny random LLM (about a minute)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def _pipeline(out_dir, *extra):
    cmd = [
        sys.executable, "-m", "xrec_pl.cli", "pipeline", "-c", "configs/pipeline/synthetic.yaml",
        "--out_dir", str(out_dir), "--synthetic_size", "tiny", "--show", "2",
        "--stage1_args", "[--trainer.max_epochs=3, --trainer.check_val_every_n_epoch=1]",
        "--stage2_args", "[--model.llm=tiny-random, --trainer.max_epochs=1, --model.max_new_tokens=8]",
        *extra,
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(out_dir.parent), "XREC_PL_CACHE": "off"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": "."})


def test_pipeline_end_to_end_and_resume(tmp_path, repo_root):
    out = tmp_path / "run"
    result = _pipeline(out)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in (
        "data/para_dict.pickle",
        "stage1/embeddings.safetensors",
        "stage1/metrics.json",
        "stage1/checkpoints/last.ckpt",
        "stage2/predictions.jsonl",
        "stage2/checkpoints/last.ckpt",
        "metrics.json",
        "per_sample.json",
        "timings.json",
    ):
        assert (out / path).exists(), path
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["stage1"]["test/recall@20"] <= 1.0
    assert "val/loss" in metrics["stage2"]
    explanations = metrics["explanations"]
    assert explanations["n"] == 10 and "bertscore_f1" in explanations and "usr" in explanations
    assert explanations["backbones"]["bertscore"]["backbone"] == "all-MiniLM-L6-v2"
    rows = [json.loads(line) for line in (out / "stage2/predictions.jsonl").read_text().splitlines()]
    assert {"uid", "iid", "prediction", "reference"} <= set(rows[0])
    assert "generated:" in result.stdout and "reference:" in result.stdout
    timings = json.loads((out / "timings.json").read_text())
    for phase in ("stage1_setup_s", "stage1_train_s", "stage2_setup_s", "stage2_train_s", "stage2_predict_s"):
        assert 0 < timings[phase] < timings["total_s"], phase
    assert "time per phase" in result.stdout and "stage 2 generation (test split)" in result.stdout

    # a second call finds every step finished: nothing is retrained or overwritten
    before = (out / "stage2/checkpoints/last.ckpt").stat().st_mtime_ns
    again = _pipeline(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1 already finished" in again.stdout and "stage 2 already finished" in again.stdout
    assert (out / "stage2/checkpoints/last.ckpt").stat().st_mtime_ns == before


def test_pipeline_bad_data_dir_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _pipeline(tmp_path / "run", "--data_dir", str(tmp_path / "empty"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("xrec-pl: error:")]
    assert len(lines) == 1 and str(tmp_path / "empty") in lines[0]
