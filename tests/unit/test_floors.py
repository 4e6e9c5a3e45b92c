"""Specificity (own vs another record's reference) and the floors (medoid, same item, same user) of a split."""

from __future__ import annotations

import json

import pytest
import torch

import xrec_pl.tools.floors as floors
from tests.unit.test_metrics import FakeScorer
from xrec_pl.cli import _evaluate_with_specificity, main
from xrec_pl.data.io import read_records
from xrec_pl.errors import DataError
from xrec_pl.tools.floors import baselines, floor_predictions, medoid_text, specificity

REFS = [f"record {i}: " + "abcdefghijklmnopqrstuvwxyz"[i : i + 6] for i in range(12)]
FAKE = {"bertscore": {"scorer": FakeScorer()}}


def test_specificity_separates_record_specific_from_constant_predictions():
    exact = specificity(REFS, REFS, ["bertscore"], n_resamples=500, **FAKE)
    gap = exact["tests"]["bertscore_f1"]
    assert exact["same_reference_pairs"] == 0
    assert gap["mean_a"] == pytest.approx(1.0) and gap["mean_b"] < 0.9
    assert gap["mean_diff"] > 0.1 and gap["ci_low"] > 0 and gap["t_pvalue"] < 0.01

    constant = specificity([REFS[0]] * len(REFS), REFS, ["bertscore"], n_resamples=500, **FAKE)
    assert constant["tests"]["bertscore_f1"]["mean_diff"] == pytest.approx(0.0, abs=1e-12)

    with pytest.raises(DataError, match="at least 2"):
        specificity(REFS[:1], REFS[:1], ["bertscore"], **FAKE)


def test_evaluate_with_specificity_writes_both_parts(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"prediction": r, "reference": r}) + "\n" for r in REFS))
    out = tmp_path / "scores.json"
    result = _evaluate_with_specificity(str(path), None, ["usr", "bertscore"], str(out), None, dict(FAKE))
    assert "per_sample" not in result and result["bertscore_f1"] == pytest.approx(1.0)
    assert result["specificity"]["tests"]["bertscore_f1"]["mean_diff"] > 0.1
    assert json.loads(out.read_text())["specificity"]["n"] == len(REFS)


def test_specificity_and_against_do_not_mix(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"prediction": r, "reference": r}) + "\n" for r in REFS))
    assert main(["evaluate", "--predictions", str(path), "--against", str(path), "--specificity", "true"]) == 2
    err = capsys.readouterr().err
    assert "--specificity" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _fake_embeddings(texts, model_path, batch_size=64):
    # a text's embedding: its letter histogram (normalised), so the medoid is computable by hand
    rows = [[t.count(c) for c in "abcdefghijklmnopqrstuvwxyz "] for t in texts]
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32) + 1e-6, dim=-1)


def test_medoid_is_the_most_central_text(monkeypatch):
    monkeypatch.setattr(floors, "_sentence_embeddings", _fake_embeddings)
    texts = ["aaaa", "aaab", "aabb", "zzzz"]
    assert medoid_text(texts) in ("aaab", "aabb")
    with pytest.raises(DataError, match="no non-empty"):
        medoid_text(["  ", ""])


def test_floors_come_from_the_training_split_only(synthetic_dir, monkeypatch):
    monkeypatch.setattr(floors, "_sentence_embeddings", _fake_embeddings)
    built = floor_predictions(synthetic_dir, "tst")
    train = read_records(synthetic_dir, "trn")
    test = read_records(synthetic_dir, "tst")
    train_texts = set(train["explanation"].astype(str))
    assert built["records"] == len(test) and built["medoid"] in train_texts
    for floor, rows in built["predictions"].items():
        assert [r["reference"] for r in rows] == test["explanation"].astype(str).tolist()
        assert all(r["prediction"] in train_texts for r in rows), floor
    first_of_item = train.groupby("iid")["explanation"].first()
    for row in built["predictions"]["same_item"]:
        expected = first_of_item.get(row["iid"], built["medoid"])
        assert row["prediction"] == expected
    covered = sum(row["iid"] in first_of_item.index for row in built["predictions"]["same_item"])
    assert built["coverage"]["same_item"] == pytest.approx(covered / len(test))


def test_baselines_writes_files_once(synthetic_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(floors, "_sentence_embeddings", _fake_embeddings)
    out = tmp_path / "floors"
    report = baselines(str(synthetic_dir), str(out), metrics=["usr"])
    assert sorted(p.name for p in out.iterdir()) == [
        "baselines.json",
        "medoid.jsonl",
        "same_item.jsonl",
        "same_user.jsonl",
    ]
    assert report["floors"]["medoid"]["usr"] == pytest.approx(1 / report["records"])
    rows = [json.loads(line) for line in (out / "same_user.jsonl").read_text().splitlines()]
    assert len(rows) == report["records"] and {"uid", "iid", "prediction", "reference"} <= set(rows[0])
    assert "medoid" in capsys.readouterr().out
    before = (out / "baselines.json").read_text()
    with pytest.raises(DataError, match="never overwrite"):
        baselines(str(synthetic_dir), str(out), metrics=["usr"])
    assert (out / "baselines.json").read_text() == before
    with pytest.raises(DataError, match="--split"):
        baselines(str(synthetic_dir), str(tmp_path / "other"), split="trn", metrics=["usr"])
