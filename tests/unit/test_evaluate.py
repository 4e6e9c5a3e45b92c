"""evaluate / evaluate_files / compare_files / load_texts on small files, with an injected fake BERTScore backend."""

from __future__ import annotations

import json
import pickle

import pandas as pd
import pytest

from tests.unit.test_metrics import FakeScorer
from xrec_pl.errors import DataError
from xrec_pl.tools.compare import compare_against, compare_files
from xrec_pl.tools.evaluate import evaluate, evaluate_files, load_texts, split_metric_kwargs

PREDS = ["the book is fun", "a dark thriller", "romance and drama", "cooking at home"]
REFS = ["a fun book", "a thriller, dark", "drama with romance", "home cooking"]
FAKE = {"bertscore": {"scorer": FakeScorer()}}


def _jsonl(path, preds, refs, extra=None):
    rows = [
        {"uid": i, "iid": 10 + i, "prediction": p, "reference": r, **(extra or {})}
        for i, (p, r) in enumerate(zip(preds, refs))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_reports_scores_backbones_and_counts():
    out = evaluate(PREDS, REFS, ("usr", "bertscore"), **FAKE)
    p, r, f = FakeScorer().score(PREDS, REFS)
    assert out["n"] == 4 and out["usr"] == 1.0
    assert out["bertscore_f1"] == pytest.approx(f.double().mean().item())
    assert {"bertscore_f1_std", "bertscore_precision", "bertscore_recall"} <= set(out)
    assert out["backbones"]["bertscore"]["injected"] is True
    assert out["backbones"]["usr"]["tokenization"].startswith("whitespace")
    assert out["empty_predictions"] == 0 and out["skipped"] == {}


def test_evaluate_default_backbone_is_described_without_loading(monkeypatch):
    out = evaluate(PREDS, REFS, ("usr",))
    assert set(out["backbones"]) == {"usr"}


def test_empty_predictions_are_scored_and_counted_empty_references_are_errors():
    out = evaluate(["", *PREDS[1:]], REFS, ("usr", "bertscore"), **FAKE, per_sample=True)
    assert out["empty_predictions"] == 1
    assert out["per_sample"]["bertscore_f1"][0] == 0.0
    with pytest.raises(DataError, match=r"refs\.pkl: 1 empty reference\(s\) at entries 2"):
        evaluate(PREDS, [REFS[0], REFS[1], "  ", REFS[3]], sources={"references": "refs.pkl"}, **FAKE)


def test_evaluate_input_errors_name_the_file():
    src = {"predictions": "p.jsonl", "references": "r.pkl"}
    with pytest.raises(DataError, match=r"p\.jsonl: 4 predictions but 3 references in r\.pkl"):
        evaluate(PREDS, REFS[:3], sources=src)
    with pytest.raises(DataError, match=r"p\.jsonl: entry 1: prediction is NoneType"):
        evaluate([PREDS[0], None, *PREDS[2:]], REFS, sources=src)
    with pytest.raises(DataError, match="no predictions"):
        evaluate([], [])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(PREDS, REFS, ("rouge",))


def test_split_metric_kwargs_routes_flat_and_nested_options():
    routed = split_metric_kwargs(
        ["bertscore", "bleurt", "llm_judge"],
        {
            "bleurt_checkpoint": "/ckpt",
            "bertscore": {"num_layers": 6, "idf": None},
            "bertscore_batch_size": 8,
            "llm_judge_max_new_tokens": 4,
            "bartscore_checkpoint": None,
            "device": "cpu",
        },
    )
    assert routed["bleurt"] == {"checkpoint": "/ckpt", "device": "cpu"}
    assert routed["bertscore"] == {"num_layers": 6, "batch_size": 8, "device": "cpu"}
    assert routed["llm_judge"] == {"max_new_tokens": 4}
    with pytest.raises(TypeError, match="unknown evaluate option 'rouge_n'"):
        split_metric_kwargs(["usr"], {"rouge_n": 2})


def test_evaluate_files_jsonl_default_references_and_output(tmp_path):
    path = _jsonl(tmp_path / "predictions.jsonl", PREDS, REFS)
    out_path = tmp_path / "out" / "metrics.json"
    result = evaluate_files(path, metrics=["usr", "bertscore"], output=out_path, **FAKE)
    written = json.loads(out_path.read_text())
    assert written["n"] == 4 and written["sources"] == {"predictions": str(path), "references": str(path)}
    assert written["bertscore_f1"] == pytest.approx(result["bertscore_f1"])


def test_evaluate_files_reference_pickles(tmp_path):
    (tmp_path / "pred.pkl").write_bytes(pickle.dumps(PREDS))
    (tmp_path / "ref.pkl").write_bytes(pickle.dumps(REFS))
    a = evaluate_files(tmp_path / "pred.pkl", tmp_path / "ref.pkl", metrics=["bertscore"], **FAKE)
    b = evaluate(PREDS, REFS, ["bertscore"], **FAKE)
    assert a["bertscore_f1"] == b["bertscore_f1"]


def test_load_texts_formats_and_errors(tmp_path):
    records = pd.DataFrame({"uid": [1, 2], "iid": [3, 4], "explanation": REFS[:2]})
    records.to_pickle(tmp_path / "tst.pkl")
    assert load_texts(tmp_path / "tst.pkl", "reference") == REFS[:2]
    with pytest.raises(DataError, match=r"tst\.pkl: missing column 'prediction' \(found: uid, iid, explanation\)"):
        load_texts(tmp_path / "tst.pkl", "prediction")
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    assert load_texts(tmp_path / "p.txt") == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "ok"}\n{"prediction": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: prediction is int, expected text"):
        load_texts(bad)
    bad.write_text('{"prediction": "ok"}\n{"reference": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: missing field 'prediction' \(found: reference\)"):
        load_texts(bad)
    bad.write_text("{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 1: not valid JSON"):
        load_texts(bad)
    (tmp_path / "mixed.pkl").write_bytes(pickle.dumps(["a", 1.5]))
    with pytest.raises(DataError, match=r"mixed\.pkl: entry 1: prediction is float"):
        load_texts(tmp_path / "mixed.pkl")
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        load_texts(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_texts(tmp_path / "x.csv")


def test_load_texts_refuses_unsafe_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(DataError, match=r"evil\.pkl"):
        load_texts(tmp_path / "evil.pkl")


def test_missing_bleurt_checkpoint_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="BLEURT checkpoint not found"):
        evaluate(PREDS, REFS, ["bleurt"], bleurt_checkpoint=str(tmp_path / "BLEURT-20"))


def test_compare_files_paired_significance(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", PREDS, REFS)
    b = _jsonl(tmp_path / "b.jsonl", ["x", "y", "z", "w"], REFS)
    out = compare_files(a, b, metrics=("usr", "bertscore"), n_resamples=200, output=tmp_path / "cmp.json", **FAKE)
    test = out["tests"]["bertscore_f1"]
    assert test["n"] == 4 and test["mean_diff"] > 0
    assert test["mean_a"] == pytest.approx(out["a"]["bertscore_f1"])
    assert test["ci_low"] <= test["mean_diff"] <= test["ci_high"]
    assert "usr" in out["a"] and "usr" not in out["tests"]
    assert json.loads((tmp_path / "cmp.json").read_text())["n"] == 4


def test_compare_files_refuses_unpaired_systems(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", PREDS, REFS)
    b = _jsonl(tmp_path / "b.jsonl", PREDS, [*REFS[:3], "another reference"])
    with pytest.raises(DataError, match=r"b\.jsonl: its references differ"):
        compare_files(a, b, metrics=("usr",))


def test_compare_against_pairs_a_shuffled_release_by_reference_text(tmp_path):
    """The other system's pairs come in another order (pickled lists, as XRec's release): paired by reference."""
    ours = _jsonl(tmp_path / "ours.jsonl", PREDS, REFS)
    order = [2, 0, 3, 1]
    theirs, their_refs = tmp_path / "pred.pkl", tmp_path / "ref.pkl"
    theirs.write_bytes(pickle.dumps([["x", "y", "z", "w"][i] for i in order]))
    their_refs.write_bytes(pickle.dumps([REFS[i] for i in order]))
    out = compare_against(ours, theirs, against_references=their_refs, metrics=("bertscore",), n_resamples=200, **FAKE)
    same_order = compare_files(ours, _jsonl(tmp_path / "b.jsonl", ["x", "y", "z", "w"], REFS), n_resamples=200, **FAKE)
    assert out["tests"]["bertscore_f1"]["mean_diff"] == pytest.approx(same_order["tests"]["bertscore_f1"]["mean_diff"])
    assert out["n"] == 4


def test_compare_against_names_the_file_missing_a_reference(tmp_path):
    ours = _jsonl(tmp_path / "ours.jsonl", PREDS, REFS)
    theirs = _jsonl(tmp_path / "theirs.jsonl", PREDS[:3], REFS[:3])
    with pytest.raises(DataError, match=r"theirs\.jsonl: 1 of the 4 references have no prediction there"):
        compare_against(ours, theirs, metrics=("usr",))
    twice = _jsonl(tmp_path / "twice.jsonl", PREDS, [REFS[0], *REFS[:3]])
    with pytest.raises(DataError, match=r"twice\.jsonl: the reference .* appears twice"):
        compare_against(ours, twice, metrics=("usr",))
