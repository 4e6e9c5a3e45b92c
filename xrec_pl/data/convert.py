"""Convert an XRec data folder once: pickles to parquet/JSON lines, embeddings to safetensors (never unpickled again)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from xrec_pl import run_layout
from xrec_pl.data.embeddings import load_reference_pair, save_embeddings
from xrec_pl.data.io import SPLITS, check_records, load_record_frame, read_para_dict
from xrec_pl.data.pickles import safe_load_pickle
from xrec_pl.errors import DataError
from xrec_pl.utils import atomic_path, atomic_write_text, atomic_write_with, check_choice, write_jsonl

log = logging.getLogger(__name__)

RecordFormat = Literal["parquet", "jsonl"]


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------
def _write_frame(df: pd.DataFrame, dst: Path, fmt: str) -> None:
    if fmt == "parquet":
        atomic_write_with(dst, lambda tmp: df.to_parquet(tmp, index=False))
    else:
        write_jsonl(dst, df.to_dict(orient="records"))


def _numpy_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON data: {type(value).__name__}")


def _is_jsonable(obj: Any) -> bool:
    try:
        json.dumps(obj, default=_numpy_scalar)
    except (TypeError, ValueError):
        return False
    return True


def _write_compact_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, separators=(",", ":"), default=_numpy_scalar) + "\n")


def convert_folder(
    src: str | os.PathLike, dst: str | os.PathLike, fmt: RecordFormat = "parquet", overwrite: bool = False
) -> list[Path]:
    """Rewrite an XRec folder so that reading it needs no unpickling.

    - ``{trn,val,tst}.pkl`` are validated with :func:`read_records` and written as ``{split}.parquet``/``.jsonl``;
    - ``para_dict.pickle`` is validated and written as ``para_dict.json``;
    - ``user_emb.pkl`` + ``item_emb.pkl`` become ``embeddings.safetensors``;
    - any other pickle (in sub-folders too) holding a DataFrame becomes ``{stem}.{fmt}``, one holding plain JSON data
      (e.g. ``xrec_release/tst_pred.pkl``, a list of strings) becomes ``{stem}.json``;
    - every non-pickle file (CSV, JSON, README, ...) is copied.

    Args:
        src: XRec folder to read.
        dst: destination folder (created).
        fmt: ``"parquet"`` or ``"jsonl"`` for tables.
        overwrite: replace existing destination files; otherwise any existing destination file is an error and
            nothing is written.

    Returns:
        The files written, sorted.

    Raises:
        DataError: bad or unsafe input, or a destination file exists and ``overwrite`` is False.
    """
    check_choice("fmt", fmt, RecordFormat)
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder")
    from xrec_pl.outputs import check_output_dir

    check_output_dir(dst, "--dst", [src])
    jobs: list[tuple[Path, Callable[[], None]]] = []  # (destination, writer)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    emb_pair = (src / "user_emb.pkl").is_file() and (src / "item_emb.pkl").is_file()
    for path in files:
        rel = path.relative_to(src)
        out_dir = dst / rel.parent
        if path.suffix not in (".pkl", ".pickle"):
            jobs.append((dst / rel, lambda p=path, d=dst / rel: _copy(p, d)))
        elif rel.parent == Path(".") and path.stem == "para_dict":
            para = read_para_dict(src) if not (src / "para_dict.json").is_file() else None
            if para is not None:
                jobs.append(
                    (out_dir / "para_dict.json", lambda d=out_dir / "para_dict.json", v=para: _write_compact_json(d, v))
                )
        elif rel.parent == Path(".") and path.stem in SPLITS:
            frame = check_records(load_record_frame(path), path)
            target = out_dir / f"{path.stem}.{fmt}"
            jobs.append((target, lambda f=frame, d=target: _write_frame(f, d, fmt)))
        elif emb_pair and rel.parent == Path(".") and path.name in ("user_emb.pkl", "item_emb.pkl"):
            if path.name == "user_emb.pkl":
                user, item = load_reference_pair(src)
                target = out_dir / run_layout.EMBEDDINGS
                jobs.append((target, lambda d=target, u=user, i=item: save_embeddings(d, u, i, {"source": "xrec"})))
        else:
            obj = safe_load_pickle(path)
            if isinstance(obj, pd.DataFrame):
                target = out_dir / f"{path.stem}.{fmt}"
                jobs.append((target, lambda f=obj, d=target: _write_frame(f, d, fmt)))
            elif _is_jsonable(obj):
                target = out_dir / f"{path.stem}.json"
                jobs.append((target, lambda d=target, v=obj: _write_compact_json(d, v)))
            else:
                raise DataError(f"{path}: cannot convert a pickled {type(obj).__name__} (not a DataFrame or JSON data)")
    targets = [t for t, _ in jobs]
    clash = [t for t in targets if t.exists()]
    if clash and not overwrite:
        raise DataError(f"{clash[0]}: destination exists ({len(clash)} file(s) in all; pass overwrite=True)")
    for _, write in jobs:
        write()
    log.info("converted %s -> %s (%d files)", src, dst, len(jobs))
    return sorted(targets)


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
