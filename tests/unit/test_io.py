"""xrec_pl.data.io: restricted unpickler, validated readers, conversion, embeddings."""

from __future__ import annotations

import builtins
import functools
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from xrec_pl.data import convert, embeddings
from xrec_pl.data import io as dio
from xrec_pl.data.io import RECORD_COLUMNS
from xrec_pl.errors import DataError


@pytest.fixture
def data_copy(synthetic_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the tiny synthetic folder."""
    return Path(shutil.copytree(synthetic_dir, tmp_path / "data"))


def _sizes(data_dir: Path) -> tuple[int, int]:
    para = dio.read_para_dict(data_dir)
    return para["user_num"], para["item_num"]


# ---------------------------------------------------------------------------------------------------------------------
# Restricted unpickler
# ---------------------------------------------------------------------------------------------------------------------
class _Reduce:
    """Pickles as ``func(*args)``: what a hostile file does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_refuses_os_system_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"payload": _Reduce(os.system, f"touch {marker}")}))
    with pytest.raises(DataError, match=r"evil\.pkl: refused global '(posix|nt|os)\.system'"):
        dio.safe_load_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (_Reduce(builtins.eval, "1"), "builtins.eval"),
        (_Reduce(builtins.exec, "x = 1"), "builtins.exec"),
        (_Reduce(builtins.getattr, int, "real"), "builtins.getattr"),
        (_Reduce(builtins.__import__, "os"), "builtins.__import__"),
        (_Reduce(subprocess.check_output, ["true"]), "subprocess.check_output"),
        (functools.partial(int, "3"), "functools.partial"),
        (_Reduce(pd.read_pickle, "/nonexistent"), "pandas."),
        (_Reduce(np.load, "/nonexistent"), "numpy.load"),
        (torch.zeros(2), "torch."),
    ],
)
def test_refuses_unsafe_globals(tmp_path: Path, payload, refused: str) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(DataError) as info:
        dio.safe_load_pickle(path)
    assert str(info.value).startswith(f"{path}: refused global '{refused}")


def test_refuses_dotted_attribute_chain(tmp_path: Path) -> None:
    path = tmp_path / "chain.pkl"
    # protocol-4 STACK_GLOBAL with a dotted name: builtins."int.__subclasses__" would walk attributes
    path.write_bytes(b"\x80\x04\x8c\x08builtins\x8c\x12int.__subclasses__\x93)R.")
    with pytest.raises(DataError, match="refused global"):
        dio.safe_load_pickle(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_accepts_pandas_and_numpy_objects(tmp_path: Path, protocol: int) -> None:
    frame = pd.DataFrame(
        {
            "uid": np.arange(3, dtype=np.int64),
            "score": np.array([0.5, 1.5, np.nan], dtype=np.float32),
            "text": ["a", "b", None],
            "obj": pd.Series(["x", "y", "z"], dtype=object),
            "cat": pd.Categorical(["p", "q", "p"]),
            "when": pd.date_range("2024-01-01", periods=3, tz="UTC"),
            "n": pd.array([1, None, 3], dtype="Int64"),
        }
    )
    obj = {
        "frame": frame,
        "series": pd.Series([1.0, 2.0], index=["a", "b"], name="s"),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "scalars": [np.int64(3), np.float32(0.5), 1 + 2j, b"raw", {1, 2}, frozenset({3}), (1, "a")],
    }
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    loaded = dio.safe_load_pickle(path)
    pd.testing.assert_frame_equal(loaded["frame"], frame)
    pd.testing.assert_series_equal(loaded["series"], obj["series"])
    np.testing.assert_array_equal(loaded["array"], obj["array"])
    assert loaded["scalars"] == obj["scalars"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "truncated"),
        (b"", "empty"),
        (b"user,item\n0,1\n", "csv"),
        (b"\x80\x05\x95\xff\xff\xff\xff\xff\xff\xff\x7f", "garbage"),
    ],
)
def test_corrupt_or_non_pickle_is_data_error(tmp_path: Path, content: bytes | None, problem: str) -> None:
    path = tmp_path / f"{problem}.pkl"
    if content is None:
        content = pickle.dumps(pd.DataFrame({"a": range(100)}))[:-40]
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"^{path}: not a readable pickle"):
        dio.safe_load_pickle(path)


def test_missing_pickle(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path / 'nope.pkl'}: file not found"):
        dio.safe_load_pickle(tmp_path / "nope.pkl")


# ---------------------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------------------
def test_reads_synthetic_folder(synthetic_dir: Path) -> None:
    n_users, n_items = _sizes(synthetic_dir)
    for split in dio.SPLITS:
        pairs = dio.read_interactions(synthetic_dir, split, n_users, n_items)
        assert pairs.dtype == np.int64 and pairs.ndim == 2 and pairs.shape[1] == 2 and len(pairs) > 0
        records = dio.read_records(synthetic_dir, split, num_users=n_users, num_items=n_items)
        assert tuple(records.columns[:6]) == RECORD_COLUMNS
        assert records["uid"].dtype == np.int64 and isinstance(records.index, pd.RangeIndex)


def test_para_dict_validation(data_copy: Path) -> None:
    path = data_copy / "para_dict.pickle"
    para = pickle.loads(path.read_bytes())
    del para["item_num"]
    path.write_bytes(pickle.dumps(para))
    with pytest.raises(DataError, match=rf"^{path}: missing key 'item_num'"):
        dio.read_para_dict(data_copy)
    para["item_num"] = 3  # shorter than trn_item_nb and smaller than the item ids
    path.write_bytes(pickle.dumps(para))
    with pytest.raises(DataError, match=rf"^{path}: "):
        dio.read_para_dict(data_copy)
    path.unlink()
    with pytest.raises(DataError, match="para_dict.pickle: file not found"):
        dio.read_para_dict(data_copy)


def _write_csv(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("usr,item\n0,1\n", "missing column 'user' (found: usr, item)"),
        ("user,item\n0,1\n1,999\n", "1 item id(s) outside [0, 50), first 999 on line 3"),
        ("user,item\n-1,1\n", "user id(s) outside"),
        ("user,item\n", "no interactions"),
        ("", "empty file"),
        ("user,item\n0,x\n", "non-integer value 'x' (line 2)"),
        ("user,item\n0,1.5\n", "non-integer value '1.5'"),
    ],
)
def test_bad_interactions(data_copy: Path, text: str, message: str) -> None:
    path = data_copy / "total_val.csv"
    _write_csv(path, text)
    with pytest.raises(DataError) as info:
        dio.read_interactions(data_copy, "val", 60, 50)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_interactions_extra_columns_and_duplicates(data_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_csv(data_copy / "total_val.csv", "user,item,rating\n0,1,5\n0,1,4\n2,3,1\n")
    with caplog.at_level("INFO", logger="xrec_pl.data.io"):
        pairs = dio.read_interactions(data_copy, "val", 60, 50)
    np.testing.assert_array_equal(pairs, [[0, 1], [0, 1], [2, 3]])
    assert "1 duplicate" in caplog.text


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"^{tmp_path / 'total_trn.csv'}: file not found"):
        dio.read_interactions(tmp_path, "trn", 1, 1)
    with pytest.raises(DataError, match=rf"^{tmp_path / 'trn.pkl'}: file not found"):
        dio.read_records(tmp_path, "trn")


def _rewrite_records(data_dir: Path, split: str, frame: pd.DataFrame) -> Path:
    path = data_dir / f"{split}.pkl"
    path.write_bytes(pickle.dumps(frame))
    return path


def test_bad_records(data_copy: Path) -> None:
    frame = dio.read_records(data_copy, "val")
    path = _rewrite_records(data_copy, "val", frame.rename(columns={"explanation": "expl"}))
    with pytest.raises(DataError, match=rf"^{path}: missing column 'explanation' \(found: uid, iid, title"):
        dio.read_records(data_copy, "val")

    bad = frame.copy()
    bad.loc[3, "iid"] = 50
    _rewrite_records(data_copy, "val", bad)
    dio.read_records(data_copy, "val")  # no bounds given: accepted
    with pytest.raises(DataError, match=rf"^{path}: 1 'iid' value\(s\) outside \[0, 50\), first 50 in row 3"):
        dio.read_records(data_copy, "val", num_users=60, num_items=50)

    bad = frame.astype({"user_summary": object})
    bad.loc[2, "user_summary"] = None
    _rewrite_records(data_copy, "val", bad)
    with pytest.raises(DataError, match=rf"^{path}: column 'user_summary' row 2 is not a non-empty string"):
        dio.read_records(data_copy, "val")

    _rewrite_records(data_copy, "val", frame.iloc[:0])
    with pytest.raises(DataError, match=rf"^{path}: no records"):
        dio.read_records(data_copy, "val")

    path.write_bytes(pickle.dumps(frame.to_dict()))
    with pytest.raises(DataError, match=rf"^{path}: expected a pandas DataFrame, found dict"):
        dio.read_records(data_copy, "val")

    path.write_bytes(pickle.dumps(frame)[:100])
    with pytest.raises(DataError, match=rf"^{path}: not a readable pickle"):
        dio.read_records(data_copy, "val")


def test_plain_formats_preferred_over_pickle(data_copy: Path) -> None:
    frame = dio.read_records(data_copy, "tst")
    frame.iloc[:3].to_parquet(data_copy / "tst.parquet", index=False)
    assert len(dio.read_records(data_copy, "tst")) == 3
    (data_copy / "tst.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=rf"^{data_copy / 'tst.parquet'}: not a readable Parquet file"):
        dio.read_records(data_copy, "tst")
    (data_copy / "tst.parquet").unlink()
    (data_copy / "tst.jsonl").write_text('{"uid": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{data_copy / 'tst.jsonl'}: line 2 is not valid JSON"):
        dio.read_records(data_copy, "tst")


# ---------------------------------------------------------------------------------------------------------------------
# convert_folder
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_convert_folder_round_trip(synthetic_dir: Path, tmp_path: Path, fmt: str) -> None:
    dst = tmp_path / "converted"
    written = convert.convert_folder(synthetic_dir, dst, fmt=fmt)
    names = {p.name for p in written}
    assert {f"{s}.{fmt}" for s in dio.SPLITS} | {"para_dict.json", "total_trn.csv", "meta.json"} <= names
    assert not list(dst.rglob("*.pkl")) and not list(dst.rglob("*.pickle"))

    assert dio.read_para_dict(dst) == dio.read_para_dict(synthetic_dir)
    n_users, n_items = _sizes(dst)
    for split in dio.SPLITS:
        np.testing.assert_array_equal(
            dio.read_interactions(dst, split, n_users, n_items),
            dio.read_interactions(synthetic_dir, split, n_users, n_items),
        )
        pd.testing.assert_frame_equal(
            dio.read_records(dst, split, n_users, n_items),
            dio.read_records(synthetic_dir, split, n_users, n_items),
        )

    with pytest.raises(DataError, match="destination exists"):
        convert.convert_folder(synthetic_dir, dst, fmt=fmt)
    assert sorted(convert.convert_folder(synthetic_dir, dst, fmt=fmt, overwrite=True)) == sorted(written)


def test_convert_folder_refuses_unsafe_pickles(data_copy: Path, tmp_path: Path) -> None:
    (data_copy / "extra.pkl").write_bytes(pickle.dumps(_Reduce(os.system, "true")))
    with pytest.raises(DataError, match="extra.pkl: refused global"):
        convert.convert_folder(data_copy, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # validation happens before any write


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------------
def test_embeddings_round_trip(tmp_path: Path) -> None:
    from safetensors import safe_open

    user, item = torch.randn(7, 4, dtype=torch.float64), torch.randn(5, 4)
    path = tmp_path / "run" / "embeddings.safetensors"
    embeddings.save_embeddings(path, user, item, metadata={"epoch": 3})
    loaded_user, loaded_item = embeddings.load_embeddings(path)
    assert loaded_user.dtype == torch.float32 and loaded_user.shape == (7, 4)
    torch.testing.assert_close(loaded_user, user.float())
    torch.testing.assert_close(loaded_item, item)
    torch.testing.assert_close(embeddings.load_embeddings(path.parent)[1], item)  # folder form
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"epoch": "3", "num_users": "7", "num_items": "5", "dim": "4"}
    assert [p.name for p in path.parent.iterdir()] == ["embeddings.safetensors"]  # no temp file left


def test_embeddings_bad_files(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "e.safetensors"
    save_file({"user": torch.zeros(2, 3)}, str(path))
    with pytest.raises(DataError, match=rf"^{path}: missing tensor 'item'"):
        embeddings.load_embeddings(path)
    save_file({"user": torch.zeros(2, 3), "item": torch.zeros(3)}, str(path))
    with pytest.raises(DataError, match=rf"^{path}: 'item' must be a 2-D tensor"):
        embeddings.load_embeddings(path)
    path.write_bytes(b"garbage")
    with pytest.raises(DataError, match=rf"^{path}: not a readable safetensors file"):
        embeddings.load_embeddings(path)
    with pytest.raises(DataError, match="file not found"):
        embeddings.load_embeddings(tmp_path / "missing.safetensors")


def test_reference_embedding_pickles(tmp_path: Path) -> None:
    weight = torch.randn(6, 4, requires_grad=True)
    user = weight * 2  # non-leaf, as the reference's forward() output
    item = torch.randn(3, 4)
    with open(tmp_path / "user_emb.pkl", "wb") as fh:
        pickle.dump(user, fh)  # the reference's format
    torch.save(item, tmp_path / "item_emb.pkl")  # torch.save format works too
    loaded_user, loaded_item = embeddings.load_embeddings(tmp_path)
    torch.testing.assert_close(loaded_user, user.detach())
    torch.testing.assert_close(loaded_item, item)
    assert not loaded_user.requires_grad

    marker = tmp_path / "pwned"
    (tmp_path / "item_emb.pkl").write_bytes(pickle.dumps(_Reduce(os.system, f"touch {marker}")))
    with pytest.raises(DataError, match=r"item_emb\.pkl: refused global"):
        embeddings.load_embeddings(tmp_path / "user_emb.pkl")
    assert not marker.exists()
