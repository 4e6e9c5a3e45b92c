"""Reading and checking XRec-format data folders without trusting their pickles.

An XRec folder (DESIGN §2) holds ``para_dict.pickle``, ``total_{trn,val,tst}.csv``, ``{trn,val,tst}.pkl`` and
optionally the reference's ``user_emb.pkl``/``item_emb.pkl``. Pickles run code when loaded, so every pickle goes
through :func:`safe_load_pickle`, whose unpickler resolves only the globals that plain containers, numpy arrays and
pandas DataFrames/Series need and refuses everything else. :func:`convert_folder` rewrites a folder once into
Parquet/JSONL/JSON/safetensors so that later reads need no unpickling at all.

Every problem with an input file raises :class:`DataError` (a ``ValueError``) whose one-line message starts with the
file's path.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xrec_pl.data.pickles import safe_load_pickle
from xrec_pl.errors import DataError

log = logging.getLogger(__name__)

RECORD_COLUMNS = ("uid", "iid", "title", "user_summary", "item_summary", "explanation")
TEXT_COLUMNS = RECORD_COLUMNS[2:]
SPLITS = ("trn", "val", "tst")
# Preference when a split exists in several formats: plain formats first, the pickle last.
RECORD_SUFFIXES = (".parquet", ".jsonl", ".pkl")


# --------------------------------------------------------------------------------------------------------------------
# para_dict
# --------------------------------------------------------------------------------------------------------------------
def _para_dict_path(data_dir: Path) -> Path:
    for name in ("para_dict.json", "para_dict.pickle", "para_dict.pkl"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"{data_dir / 'para_dict.pickle'}: file not found (nor para_dict.json)")


def _check_int(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"{path}: '{key}' must be a positive integer (found {value!r})")
    return int(value)


def _check_neighbours(path: Path, key: str, lists: Any, length: int, bound: int) -> list[list[int]]:
    if not isinstance(lists, (list, tuple)):
        raise DataError(f"{path}: '{key}' must be a list of lists (found {type(lists).__name__})")
    if len(lists) != length:
        raise DataError(f"{path}: '{key}' has {len(lists)} entries, expected {length}")
    out = []
    for i, nb in enumerate(lists):
        try:
            arr = np.asarray(nb, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: '{key}'[{i}] is not a list of integers") from err
        if arr.size and (arr.min() < 0 or arr.max() >= bound):
            raise DataError(f"{path}: '{key}'[{i}] holds an id outside [0, {bound})")
        out.append(arr.tolist())
    return out


def read_para_dict(data_dir: str | os.PathLike) -> dict:
    """Read and validate ``para_dict.json`` (written by :func:`convert_folder`) or ``para_dict.pickle``.

    Args:
        data_dir: XRec data folder.

    Returns:
        ``{"user_num": int, "item_num": int, "{split}_user_nb": list[list[int]], "{split}_item_nb": ...}`` for the
        splits present (``trn`` is required). Other keys are passed through.

    Raises:
        DataError: missing file, missing key, wrong lengths or ids out of range.
    """
    path = _para_dict_path(Path(data_dir))
    try:
        return _read_para_dict(path)
    except DataError as err:
        others = [p.name for p in (path.with_name("para_dict.pickle"), path.with_name("para_dict.pkl")) if p.is_file()]
        if path.suffix == ".json" and others:  # say which of two files was read: a stale JSON hides the pickle
            raise DataError(f"{err} [read instead of {others[0]} beside it; remove the stale file]") from None
        raise


def _read_para_dict(path: Path) -> dict:
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
    else:
        raw = safe_load_pickle(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a dict, found {type(raw).__name__}")
    for key in ("user_num", "item_num", "trn_user_nb", "trn_item_nb"):
        if key not in raw:
            raise DataError(f"{path}: missing key '{key}' (found: {', '.join(map(str, raw))})")
    out = dict(raw)
    out["user_num"] = n_users = _check_int(path, "user_num", raw["user_num"])
    out["item_num"] = n_items = _check_int(path, "item_num", raw["item_num"])
    for split in SPLITS:
        for side, length, bound in (("user", n_users, n_items), ("item", n_items, n_users)):
            key = f"{split}_{side}_nb"
            if key in raw:
                out[key] = _check_neighbours(path, key, raw[key], length, bound)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Interactions
# --------------------------------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def read_interactions(data_dir: str | os.PathLike, split: str, num_users: int, num_items: int) -> np.ndarray:
    """Read ``total_{split}.csv`` as an ``(N, 2)`` int64 array of ``[user, item]`` rows.

    Extra columns are ignored; duplicate rows are kept (and counted in a log message).

    Raises:
        DataError: missing file or columns, non-integer ids, ids outside ``[0, num_users)``/``[0, num_items)``,
            or no rows.
    """
    _check_split(split)
    return read_interaction_csv(Path(data_dir) / f"total_{split}.csv", num_users, num_items)


def read_interaction_csv(path: str | os.PathLike, num_users: int | None, num_items: int | None) -> np.ndarray:
    """Read one interaction CSV (columns ``user,item``) as an ``(N, 2)`` int64 array of ``[user, item]`` rows.

    The checks of :func:`read_interactions`; a bound of ``None`` only requires ids >= 0 (e.g. XRec's ``total.csv``,
    read before the graph's size is known).

    Raises:
        DataError: as :func:`read_interactions`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # ids are read as text: a number such as 2**63 or 1e400 would otherwise be wrapped or rounded before the
        # check, and the message would not show what the file holds
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: empty file (expected a header 'user,item' and rows)") from err
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from err
    missing = [c for c in ("user", "item") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (found: {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise DataError(f"{path}: no interactions")
    pairs = np.empty((len(df), 2), dtype=np.int64)  # (N, 2)
    for j, (col, limit) in enumerate((("user", num_users), ("item", num_items))):
        bound = "inf" if limit is None else limit
        text = df[col].str.strip()
        integer = text.str.fullmatch(r"-?\d{1,18}").to_numpy(dtype=bool)
        if not integer.all():
            first = int(np.flatnonzero(~integer)[0])
            raise DataError(
                f"{path}: column '{col}' holds a non-integer value {df[col].iloc[first][:40]!r} (line {first + 2}); "
                f"ids are integers in [0, {bound})"
            )
        arr = pd.to_numeric(text).to_numpy(dtype=np.int64)
        bad_rows = np.flatnonzero((arr < 0) | ((arr >= limit) if limit is not None else False))
        if bad_rows.size:
            first = int(bad_rows[0])
            raise DataError(
                f"{path}: {bad_rows.size} {col} id(s) outside [0, {bound}), first {arr[first]} on line {first + 2}"
            )
        pairs[:, j] = arr
    width = np.int64(num_items if num_items is not None else pairs[:, 1].max() + 1)
    n_unique = np.unique(pairs[:, 0] * width + pairs[:, 1]).size
    if n_unique < len(pairs):
        log.info("%s: %d duplicate interaction row(s) of %d", path, len(pairs) - n_unique, len(pairs))
    return pairs


# --------------------------------------------------------------------------------------------------------------------
# Text records
# --------------------------------------------------------------------------------------------------------------------
def _record_path(data_dir: Path, split: str) -> Path:
    for suffix in RECORD_SUFFIXES:
        path = data_dir / f"{split}{suffix}"
        if path.is_file():
            return path
    raise DataError(f"{data_dir / f'{split}.pkl'}: file not found (nor {split}.parquet / {split}.jsonl)")


def _read_jsonl(path: Path) -> pd.DataFrame:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {lineno} is not a JSON object")
            rows.append(row)
    return pd.DataFrame(rows)


def load_record_frame(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as err:  # pyarrow raises its own error types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from err
    if path.suffix == ".jsonl":
        try:
            return _read_jsonl(path)
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text") from err
    obj = safe_load_pickle(path)
    if not isinstance(obj, pd.DataFrame):
        raise DataError(f"{path}: expected a pandas DataFrame, found {type(obj).__name__}")
    return obj


def check_records(
    df: pd.DataFrame, path: str | os.PathLike, num_users: int | None = None, num_items: int | None = None
) -> pd.DataFrame:
    """Validate a record table (columns, non-empty strings, integer ids in range) and return a clean copy.

    The result has ``RECORD_COLUMNS`` first (extra columns kept after them), int64 ids, object-dtype text columns
    holding ``str`` (whatever the source format) and a fresh RangeIndex.
    """
    missing = [c for c in RECORD_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column '{missing[0]}' (found: {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise DataError(f"{path}: no records")
    df = df[list(RECORD_COLUMNS) + [c for c in df.columns if c not in RECORD_COLUMNS]].reset_index(drop=True)
    df.columns = pd.Index([str(c) for c in df.columns], dtype=object)
    for col, bound in (("uid", num_users), ("iid", num_items)):
        values = df[col]
        if not pd.api.types.is_integer_dtype(values.dtype):
            raise DataError(f"{path}: column '{col}' must hold integers (found dtype {values.dtype})")
        arr = values.to_numpy(dtype=np.int64)
        bad = np.flatnonzero((arr < 0) | ((arr >= bound) if bound is not None else False))
        if bad.size:
            raise DataError(
                f"{path}: {bad.size} '{col}' value(s) outside [0, {bound if bound is not None else 'inf'}), "
                f"first {arr[bad[0]]} in row {int(bad[0])}"
            )
        df[col] = arr
    for col in TEXT_COLUMNS:
        ok = df[col].map(lambda v: isinstance(v, str) and bool(v.strip())).to_numpy(dtype=bool)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            raise DataError(f"{path}: column '{col}' row {row} is not a non-empty string ({df[col].iloc[row]!r})")
        df[col] = df[col].astype(object)  # the same dtype whichever format the records came from
    return df


def read_records(
    data_dir: str | os.PathLike, split: str, num_users: int | None = None, num_items: int | None = None
) -> pd.DataFrame:
    """Read the text records of a split: ``{split}.parquet``, ``{split}.jsonl`` or ``{split}.pkl``.

    Where several exist the plain formats win (Parquet, then JSONL), so a converted folder never unpickles.

    Args:
        data_dir: XRec data folder.
        split: ``trn``, ``val`` or ``tst``.
        num_users: when given, ``uid`` must lie in ``[0, num_users)``.
        num_items: when given, ``iid`` must lie in ``[0, num_items)``.

    Returns:
        DataFrame with ``RECORD_COLUMNS`` first, int64 ``uid``/``iid``, object-dtype ``str`` text, RangeIndex.

    Raises:
        DataError: missing file or column, empty split, null/non-string text, ids out of range.
    """
    _check_split(split)
    path = _record_path(Path(data_dir), split)
    return check_records(load_record_frame(path), path, num_users, num_items)
