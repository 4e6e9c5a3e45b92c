"""`xrec-pl experiment` at CI size: two arms, one seed, tiny data and the tiny random LLM."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_experiment_runs_arms_writes_report_and_resumes(tmp_path):
    out = tmp_path / "suite"
    cmd = [
        sys.executable, "-m", "xrec_pl.cli", "experiment", "-c", "configs/experiments/smoke.yaml",
        "--name", "ci", "--out_dir", str(out), "--synthetic_size", "tiny", "--seeds", "[0]",
        "--arms", "[xrec, fixed_emb, plain_llm]",
        "--stage1_args", "[--trainer.max_epochs=2, --trainer.check_val_every_n_epoch=1]",
        "--stage2_args", "[--model.llm=tiny-random, --trainer.max_epochs=1, --model.max_new_tokens=6]",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": "."}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["arm"] for r in rows) == ["fixed_emb", "plain_llm", "xrec"]
    report = (out / "report.md").read_text()
    assert "Paired significance against `xrec`" in report and "| fixed_emb | bertscore_f1 | 10 |" in report
    # synthetic data: the community metrics (generated text and forced choice) are in the results and the tests
    assert "| fixed_emb | community_choice | 10 |" in report and "community" in rows[0]
    assert 0.0 <= float(rows[0]["community_choice"]) <= 1.0
    assert (out / "report.png").exists()
    # stage 1 ran once per seed and was shared by the arms
    assert len(list((out / "_stage1").iterdir())) == 1
    # the plain-LLM arm did not train
    assert not (out / "plain_llm" / "seed0" / "stage2" / "checkpoints").exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1: LightGCN" not in again.stdout and "stage 2: explainer" not in again.stdout
