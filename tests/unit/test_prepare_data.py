"""``xrec-pl prepare-data``: a raw XRec release folder becomes the folder the loaders read, or nothing is written.

The real-data tests rebuild a "raw" release folder from ``../shared/data/{amazon,yelp}`` (which are prepared copies)
by removing or replacing what the release lacks, run the command, and compare with the shared copy. The rest use the
tiny synthetic dataset (same layout) and run in a fraction of a second.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_modules.explanations import ExplanationDataModule
from data_modules.graph import InteractionDataModule
from xrec_pl.cli import main
from xrec_pl.data import prepare
from xrec_pl.data.io import SPLITS, read_interactions, read_para_dict, read_records
from xrec_pl.data.release_graph import LFS_POINTER
from xrec_pl.errors import DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not all((SHARED / name / "para_dict.pickle").is_file() for name in ("amazon", "yelp")),
    reason=f"real data not found at {SHARED}",
)


def _raw_copy(src: Path, dst: Path) -> Path:
    """The top-level files of ``src`` in ``dst`` (writable), as a clone of the release would hold them."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.is_file():
            shutil.copyfile(path, dst / path.name)
    return dst


def _lfs_pointer(path: Path) -> None:
    path.write_bytes(LFS_POINTER + b"v1\noid sha256:958649268ab8\nsize 85964803\n")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["prepare-data", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _rows(path: Path) -> list[tuple[int, int]]:
    frame = pd.read_csv(path)
    return sorted(zip(frame["user"].tolist(), frame["item"].tolist()))


# ---------------------------------------------------------------------------------------------------- real data
@needs_shared
def test_amazon_without_total_trn_is_rebuilt_as_the_shared_copy(tmp_path, capsys):
    shared = SHARED / "amazon"
    raw = _raw_copy(shared, tmp_path / "XRec" / "data" / "amazon")
    (raw / "total_trn.csv").unlink()  # the release's data/amazon has no total_trn.csv
    for name in ("tst_pred.pkl", "tst_ref.pkl"):  # the release keeps them beside the records
        shutil.copyfile(shared / "xrec_release" / name, raw / name)
    _lfs_pointer(raw / "user_emb.pkl")  # not needed: a pointer there is no error
    out = tmp_path / "prepared" / "amazon"

    code, stdout, err = _run(capsys, "--source", str(raw), "--out", str(out))

    assert code == 0, err
    assert "derived total_trn.csv from para_dict.pickle 'trn_user_nb'" in stdout
    assert "graph: 15,349 users, 15,247 items" in stdout and "records: trn 2,376, val 295, tst 329" in stdout
    assert "interactions: trn 288,671, val 36,084, tst 36,084" in stdout and "--data.domain books" in stdout
    assert "user_emb.pkl" in stdout.split("not needed")[1]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["para_dict.pickle", *(f"total_{s}.csv" for s in SPLITS), *(f"{s}.pkl" for s in SPLITS), "tst_pred.pkl"]
        + ["tst_ref.pkl"]
    )
    assert _rows(out / "total_trn.csv") == _rows(shared / "total_trn.csv")
    assert (out / "total_trn.csv").read_bytes() == (shared / "total_trn.csv").read_bytes()  # same order too
    for name in ("para_dict.pickle", "total_val.csv", "total_tst.csv", "trn.pkl", "val.pkl", "tst.pkl"):
        assert (out / name).read_bytes() == (shared / name).read_bytes(), name
    graph = InteractionDataModule(out)
    assert (graph.num_users, graph.num_items) == (15349, 15247)
    assert np.array_equal(graph.interactions("trn"), InteractionDataModule(shared).interactions("trn"))
    text = ExplanationDataModule(str(out))
    assert [text.num_records(s) for s in SPLITS] == [2376, 295, 329]
    assert not list(out.parent.glob(".*"))  # the staging folder was renamed, nothing left beside it


@needs_shared
def test_yelp_release_folder_gets_para_dict_and_graph_split_records_equal_to_the_shared_copy(tmp_path, capsys):
    shared = SHARED / "yelp"
    raw = _raw_copy(shared, tmp_path / "yelp")
    (raw / "para_dict.pickle").unlink()  # the release's data/yelp has no para_dict.pickle, but a total.csv
    parts = [pd.read_csv(shared / f"total_{s}.csv") for s in SPLITS]
    pd.concat(parts).sample(frac=1.0, random_state=0).to_csv(raw / "total.csv", index=False)
    shutil.copyfile(shared / "xrec_release" / "tst_records.pkl", raw / "tst.pkl")  # the 3,000 public records
    for split in ("trn", "val"):
        _lfs_pointer(raw / f"{split}.pkl")  # the training records were never obtainable
    out = tmp_path / "yelp-prepared"

    code, _, err = _run(capsys, "--source", str(raw), "--out", str(out), "--records", "release")
    assert code == 2 and err.count("\n") == 1
    assert f"{raw / 'trn.pkl'}: a Git LFS pointer" in err and "--records graph_split" in err
    assert not out.exists()

    code, stdout, err = _run(capsys, "--source", str(raw), "--out", str(out), "--records", "graph_split")

    assert code == 0, err
    assert "derived para_dict.json" in stdout and "distinct users/items of total.csv" in stdout
    assert "derived trn.parquet from tst.pkl" in stdout and "--data.domain business" in stdout
    assert read_para_dict(out) == read_para_dict(shared)  # sizes and every neighbour list, in the same order
    for split in SPLITS:
        assert (out / f"total_{split}.csv").read_bytes() == (shared / f"total_{split}.csv").read_bytes()
        pd.testing.assert_frame_equal(read_records(out, split), read_records(shared, split))
    graph = InteractionDataModule(out)
    assert (graph.num_users, graph.num_items) == (15962, 14085)
    assert [ExplanationDataModule(str(out)).num_records(s) for s in SPLITS] == [2434, 286, 280]


# ---------------------------------------------------------------------------------------------- synthetic data
@pytest.fixture
def raw(synthetic_dir, tmp_path) -> Path:
    return _raw_copy(synthetic_dir, tmp_path / "raw")


def test_google_like_folder_without_para_dict_or_total_csv(raw, synthetic_dir, tmp_path, capsys):
    (raw / "para_dict.pickle").unlink()  # data/google: the three split CSVs only
    code, stdout, err = _run(capsys, "--source", str(raw), "--out", str(tmp_path / "out"), "--dataset", "google")
    assert code == 0, err
    assert "distinct users/items of total_{trn,val,tst}.csv" in stdout and "--data.domain business" in stdout
    assert read_para_dict(tmp_path / "out") == read_para_dict(synthetic_dir)
    assert "README.md" in stdout.split("not needed")[1]


def test_a_split_csv_that_disagrees_with_para_dict_is_refused(raw, tmp_path):
    with open(raw / "total_val.csv", "a", encoding="utf-8") as fh:
        fh.write("0,0\n0,1\n0,2\n")  # edges para_dict's val_user_nb does not hold (some are not even new)
    (raw / "total_trn.csv").unlink()
    with pytest.raises(DataError, match=r"total_val\.csv: \d+ edge\(s\) differ from para_dict\.pickle's 'val_user_nb'"):
        prepare.prepare_folder(raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_records_pickled_as_a_list_of_dicts_are_rewritten_as_parquet(raw, synthetic_dir, tmp_path):
    rows = read_records(synthetic_dir, "trn").to_dict(orient="records")
    (raw / "trn.pkl").write_bytes(pickle.dumps(rows, protocol=4))  # how the release's process/ scripts pickle them
    summary = prepare.prepare_folder(raw, tmp_path / "out")
    assert "trn.parquet" in summary.derived and not (tmp_path / "out" / "trn.pkl").exists()
    pd.testing.assert_frame_equal(read_records(tmp_path / "out", "trn"), read_records(synthetic_dir, "trn"))
    assert summary.records == {"trn": 40, "val": 10, "tst": 10} and summary.dataset is None


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["para_dict.pickle", "tst.pkl", "tst_pred.pkl"])
def test_a_planted_pickle_runs_no_code_and_writes_nothing(raw, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    (raw / name).write_bytes(pickle.dumps(_Exploit(marker)))
    out = tmp_path / "out"
    code, stdout, err = _run(capsys, "--source", str(raw), "--out", str(out))
    assert code == 2 and stdout == ""
    assert err.startswith(f"xrec-pl: error: {raw / name}:") and err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists()
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_a_failure_after_writing_leaves_nothing(raw, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise DataError("records: simulated failure while reading back")

    monkeypatch.setattr(prepare, "read_records", broken)
    (tmp_path / "out").mkdir()  # an empty destination is allowed, and stays as it was
    with pytest.raises(DataError, match="simulated failure"):
        prepare.prepare_folder(raw, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no staging folder left


def test_a_non_empty_destination_is_refused_untouched(raw, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep", encoding="utf-8")
    code, _, err = _run(capsys, "--source", str(raw), "--out", str(tmp_path / "out"))
    assert code == 2 and "exists and is not empty" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: (raw / "total_val.csv").unlink(), r"total_val\.csv: file not found"),
        (lambda raw: _lfs_pointer(raw / "total_tst.csv"), r"total_tst\.csv: a Git LFS pointer"),
        (lambda raw: (raw / "total_tst.csv").write_text("user,item\n0,x\n"), r"total_tst\.csv: column 'item'"),
        (lambda raw: (raw / "val.pkl").unlink(), r"val\.pkl: file not found.*--records graph_split"),
        (lambda raw: (raw / "tst_ref.pkl").write_bytes(pickle.dumps(["a", "b"])), r"tst_ref\.pkl: 2 strings"),
        (
            lambda raw: (raw / "total_trn.csv").write_text("user,item\n" + "".join(f"3,{i}\n" for i in range(50))),
            r"total_trn\.csv: user 3 has interacted with all 50 items",
        ),
    ],
    ids=["no-val-csv", "lfs-csv", "bad-id", "no-val-records", "ref-length", "all-items-user"],
)
def test_bad_input_is_one_line_naming_the_file(raw, tmp_path, capsys, change, message):
    (raw / "para_dict.pickle").unlink()  # the graph then comes from the CSVs alone
    (raw / "tst_pred.pkl").write_bytes(pickle.dumps(["x", "y", "z"]))
    change(raw)
    code, _, err = _run(capsys, "--source", str(raw), "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_the_rebuilt_graph_reads_as_the_original(raw, synthetic_dir, tmp_path):
    (raw / "total_trn.csv").unlink()
    summary = prepare.prepare_folder(raw, tmp_path / "out", dataset="amazon")
    assert any("15,349 users" in note for note in summary.notes)  # not the release's Amazon graph: said so
    para = read_para_dict(synthetic_dir)
    ours = read_interactions(tmp_path / "out", "trn", para["user_num"], para["item_num"])
    theirs = read_interactions(synthetic_dir, "trn", para["user_num"], para["item_num"])
    assert sorted(map(tuple, ours.tolist())) == sorted(map(tuple, theirs.tolist()))
