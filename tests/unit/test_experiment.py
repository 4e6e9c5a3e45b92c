"""The experiment runner's validation and report, on fabricated finished runs (no training)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from xrec_pl.errors import ConfigError
from xrec_pl.tools.experiment import experiment
from xrec_pl.tools.report import write_report
from xrec_pl.tools.suite import Suite, load_suite


def _fake_run(run_dir, f1_scores, usr):
    run_dir.mkdir(parents=True)
    explanations = {"bertscore_f1": float(np.mean(f1_scores)), "usr": usr, "n": len(f1_scores)}
    (run_dir / "metrics.json").write_text(json.dumps({"explanations": explanations}))
    rows = [{"uid": i, "iid": 100 + i, "score": float(s)} for i, s in enumerate(f1_scores)]
    (run_dir / "per_sample.json").write_text(json.dumps({"bertscore_f1": rows}))


def test_report_from_finished_runs(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.7, size=40)
    for seed in (0, 1):
        _fake_run(tmp_path / "xrec" / f"seed{seed}", base + 0.05 + rng.normal(0, 0.005, 40), 1.0)
        _fake_run(tmp_path / "fixed_emb" / f"seed{seed}", base + rng.normal(0, 0.005, 40), 0.5)
        _fake_run(tmp_path / "no_moe" / f"seed{seed}", base + 0.05 + rng.normal(0, 0.005, 40), 1.0)
    spec = Suite(
        name="t", arms=["xrec", "fixed_emb", "no_moe"], out_dir=str(tmp_path), stage1_config="a", stage2_config="b"
    )
    result = write_report(spec, tmp_path, [0, 1])

    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 6 and {r["arm"] for r in rows} == {"xrec", "fixed_emb", "no_moe"}
    sig = {r["arm"]: r for r in result["significance"]}
    assert sig["fixed_emb"]["n"] == 80  # per-record pairs pooled over both seeds
    assert sig["fixed_emb"]["mean_diff"] == pytest.approx(-0.05, abs=0.005)
    assert sig["fixed_emb"]["ci_high"] < 0 and sig["fixed_emb"]["t_pvalue"] < 1e-6
    assert sig["no_moe"]["t_pvalue"] > 0.01  # no real difference
    report = (tmp_path / "report.md").read_text()
    assert "| fixed_emb | bertscore_f1 | 80 | -0.05" in report
    assert (tmp_path / "report.png").stat().st_size > 1000


def test_unknown_arm_empty_seeds_and_foreign_folder(tmp_path):
    with pytest.raises(ConfigError, match="unknown arm"):
        experiment(name="t", arms=["xrec", "telepathy"], out_dir=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="seed list is empty"):
        experiment(name="t", arms=["xrec"], out_dir=str(tmp_path / "b"), seeds=[])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "suite.json").write_text(json.dumps({"name": "other"}))
    with pytest.raises(ConfigError, match="holds results of suite 'other'"):
        experiment(name="t", arms=["xrec"], out_dir=str(tmp_path / "c"), report_only=True)


def test_shipped_suites_load():
    for name in ("smoke", "amazon-cpu", "amazon-7b"):
        suite = load_suite(f"configs/experiments/{name}.yaml")
        assert suite.reference_arm in suite.arms


def test_sweep_suites_cover_the_requested_points():
    from xrec_pl.tools.experiment import _stage1_key
    from xrec_pl.tools.suite import ARMS

    experts = load_suite("configs/experiments/sweep-experts-synthetic.yaml")
    assert experts.data_dir is None and "community" in experts.metrics  # synthetic: the community test decides
    assert [ARMS[a].get("stage2", []) for a in experts.arms] == [
        ["ablations/experts_1.yaml"],
        ["ablations/experts_2.yaml"],
        ["ablations/experts_4.yaml"],
        [],
        ["ablations/experts_16.yaml"],
    ]
    dims = load_suite("configs/experiments/sweep-dim-synthetic.yaml")
    assert dims.arms == ["dim_32", "xrec", "dim_128"]
    assert len({_stage1_key(a) for a in dims.arms}) == 3  # each width trains its own LightGCN
    amazon = load_suite("configs/experiments/sweep-amazon.yaml")
    assert amazon.data_dir == "../shared/data/amazon" and {"experts_1", "dim_128", "xrec"} <= set(amazon.arms)


def test_folder_of_same_suite_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    _fake_run(out / "xrec" / "seed0", [0.5, 0.6], 1.0)
    kwargs = {"name": "t", "arms": ["xrec"], "out_dir": str(out), "report_only": True}
    experiment(**kwargs, stage2_args=["--data.train_subset=64"])  # writes suite.json with its settings
    with pytest.raises(ConfigError, match=r"stage2_args changed"):
        experiment(**kwargs, stage2_args=["--data.train_subset=128"])
    assert (out / "xrec" / "seed0" / "metrics.json").exists()  # nothing finished is touched
    experiment(**kwargs, stage2_args=["--data.train_subset=64"])  # same settings: fine


def test_arms_without_trainable_parts_skip_fit():
    from xrec_pl.tools.suite import ARMS

    assert ARMS["plain_llm"]["train"] is False and ARMS["no_injection"]["train"] is False
    assert ARMS["xrec"].get("train", True)
