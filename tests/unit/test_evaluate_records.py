"""Pairing shuffled released predictions with a split's records by reference text."""

from __future__ import annotations

import pandas as pd
import pytest

from xrec_pl.errors import DataError
from xrec_pl.tools.evaluate import restrict_to_records


def _records(path, explanations):
    frame = pd.DataFrame(
        {
            "uid": range(len(explanations)),
            "iid": range(len(explanations)),
            "title": "t",
            "user_summary": "u",
            "item_summary": "i",
            "explanation": explanations,
        }
    )
    frame.to_pickle(path)
    return path


def test_keeps_exactly_the_split_records(tmp_path):
    path = _records(tmp_path / "tst.pkl", ["ref b", "ref d"])
    preds, refs, dropped = restrict_to_records(["pa", "pb", "pc", "pd"], ["ref a", "ref b", "ref c", "ref d"], path)
    assert preds == ["pb", "pd"] and refs == ["ref b", "ref d"] and dropped == 2


def test_missing_or_duplicated_record_is_an_error(tmp_path):
    path = _records(tmp_path / "tst.pkl", ["ref b", "ref z"])
    with pytest.raises(DataError, match="tst.pkl"):
        restrict_to_records(["pa", "pb"], ["ref a", "ref b"], path)
    path = _records(tmp_path / "tst2.pkl", ["ref b"])
    with pytest.raises(DataError, match="exactly one"):
        restrict_to_records(["pa", "pb"], ["ref b", "ref b"], path)


def test_records_from_a_predictions_file_and_missing_file(tmp_path):
    import json

    subset = tmp_path / "predictions.jsonl"
    subset.write_text("".join(json.dumps({"prediction": "x", "reference": r}) + "\n" for r in ["ref c", "ref a"]))
    preds, refs, dropped = restrict_to_records(["pa", "pb", "pc"], ["ref a", "ref b", "ref c"], subset)
    assert preds == ["pa", "pc"] and refs == ["ref a", "ref c"] and dropped == 1
    with pytest.raises(DataError, match="nope.pkl: records file not found"):
        restrict_to_records(["pa"], ["ref a"], tmp_path / "nope.pkl")
