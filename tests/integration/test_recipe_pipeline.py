"""`recipe: xrec` presets end to end on an XRec-format folder (the tiny synthetic one) with the tiny random LLM.

The Yelp/Google presets differ from this one only in data_dir and the business wording (tests/unit/test_yelp.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_recipe_pipeline_on_any_xrec_folder(tmp_path, synthetic_dir, repo_root):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "xrec_pl.cli", "pipeline", "-c", "configs/recipes/xrec/yelp_pipeline.yaml",
        "--data_dir", str(synthetic_dir), "--out_dir", str(out), "--show", "1", "--metrics", "[usr]",
        "--stage1_args", "[--trainer.max_epochs=2]",
        "--stage2_args", "[--model.llm=tiny-random, --data.train_subset=6, --data.eval_subset=4, "
        "--model.max_new_tokens=12, --model.do_sample=true]",
    ]  # fmt: skip
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XREC_PL_CACHE": "off"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "PYTHONPATH": "."})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["stage1"]["test/recall@20"] <= 1.0
    rows = [json.loads(line) for line in (out / "stage2/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and not any("[" in r["prediction"] for r in rows)
    config = (out / "stage2/logs/version_0/config.yaml").read_text()
    assert "style: xrec_exact" in config and "postprocess: xrec" in config and "batch_size: 1" in config
    assert (out / "stage2/checkpoints/final.ckpt").exists() and "quantization=auto" in result.stderr
