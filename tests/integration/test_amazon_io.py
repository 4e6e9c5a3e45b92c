"""Read the real XRec Amazon-books folder (../shared/data/amazon) through xrec_pl.data.io."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xrec_pl.data import io as dio
from xrec_pl.data.convert import convert_folder

pytestmark = pytest.mark.integration

INTERACTIONS = {"trn": 288_671, "val": 36_084, "tst": 36_084}
RECORDS = {"trn": 2_376, "val": 295, "tst": 329}


def test_amazon_counts(amazon_dir: Path) -> None:
    para = dio.read_para_dict(amazon_dir)
    n_users, n_items = para["user_num"], para["item_num"]
    assert (n_users, n_items) == (15_349, 15_247)
    for split in dio.SPLITS:
        pairs = dio.read_interactions(amazon_dir, split, n_users, n_items)
        assert pairs.shape == (INTERACTIONS[split], 2)
        assert sum(map(len, para[f"{split}_user_nb"])) == INTERACTIONS[split]
        records = dio.read_records(amazon_dir, split, num_users=n_users, num_items=n_items)
        assert len(records) == RECORDS[split]
        # each record is an edge of the graph split it is filed under
        edges = set((pairs[:, 0] * n_items + pairs[:, 1]).tolist())
        assert set((records["uid"] * n_items + records["iid"]).tolist()) <= edges


def test_amazon_release_pickles_load_safely(amazon_dir: Path) -> None:
    release = amazon_dir / "xrec_release"
    preds, refs = dio.safe_load_pickle(release / "tst_pred.pkl"), dio.safe_load_pickle(release / "tst_ref.pkl")
    assert len(preds) == len(refs) == 3_000 and all(isinstance(s, str) for s in preds + refs)
    records = dio.safe_load_pickle(release / "tst_records.pkl")
    assert tuple(records.columns) == dio.RECORD_COLUMNS and len(records) == 3_000


def test_amazon_convert_round_trip(amazon_dir: Path, tmp_path: Path) -> None:
    written = convert_folder(amazon_dir, tmp_path / "amazon", fmt="parquet")
    assert not [p for p in written if p.suffix in (".pkl", ".pickle")]
    assert dio.read_para_dict(tmp_path / "amazon") == dio.read_para_dict(amazon_dir)
    for split in dio.SPLITS:
        original = dio.read_records(amazon_dir, split)
        converted = dio.read_records(tmp_path / "amazon", split)
        assert converted.equals(original)
    np.testing.assert_array_equal(
        dio.read_interactions(tmp_path / "amazon", "tst", 15_349, 15_247),
        dio.read_interactions(amazon_dir, "tst", 15_349, 15_247),
    )
